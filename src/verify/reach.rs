//! Where a registry check may connect. A RegistryCredential's registry host and the token
//! realm its registry's challenge names are a tenant's to choose, so without limits a check is
//! a probe of any address the controller reaches (the cluster network included), and its
//! Verified message says what answered. Operators can list the registry host suffixes checks
//! may reach (`--verify-allowed-hosts`); and a tenant's check reaches no private, loopback or
//! link-local address and never speaks plain HTTP, unless `--verify-private-networks` allows
//! it. ClusterRegistryCredentials, which only the platform writes, are not held to the latter.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

/// What one check may reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Host suffixes checks may connect to (`example.com` allows it and `*.example.com`);
    /// empty: any host.
    pub allowed_hosts: Vec<String>,
    /// A tenant's check: no private addresses, no plain HTTP.
    pub public_only: bool,
}

impl Reach {
    /// Why a request to `host` (`name[:port]`, or an IP literal) over `scheme` may not be
    /// made, if it may not.
    pub fn refusal(&self, scheme: &str, host: &str) -> Option<String> {
        let name = host_name(host);
        if !self.allowed_hosts.is_empty() && !self.allowed_hosts.iter().any(|s| suffix_matches(&name, s)) {
            return Some(format!("{name} is not among the hosts registry checks may reach (--verify-allowed-hosts)"));
        }
        if !self.public_only {
            return None;
        }
        if scheme != "https" {
            return Some(format!(
                "a RegistryCredential's check speaks only HTTPS; plain HTTP to {name} is for \
                 ClusterRegistryCredentials (or --verify-private-networks)"
            ));
        }
        match name.parse::<IpAddr>() {
            Ok(ip) if is_private(ip) => Some(private_refusal(&name)),
            _ => None,
        }
    }
}

fn private_refusal(name: &str) -> String {
    format!(
        "{name} is a private, loopback or link-local address, which a RegistryCredential's check may not \
         reach (ClusterRegistryCredentials may, or --verify-private-networks)"
    )
}

/// `host` without its port and IPv6 brackets, lower-cased.
fn host_name(host: &str) -> String {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn suffix_matches(name: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_start_matches("*.").trim_start_matches('.').to_ascii_lowercase();
    !suffix.is_empty() && (name == suffix || name.ends_with(&format!(".{suffix}")))
}

/// Loopback, private (RFC 1918, unique local), link-local, shared (RFC 6598), unspecified,
/// broadcast and documentation addresses, and IPv4 ones mapped into IPv6.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private_v4(v4),
            None => is_private_v6(v6),
        },
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || (a == 100 && (64..128).contains(&b))
        || a == 0
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback() || ip.is_unspecified() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
}

/// A DNS resolver that drops private addresses, for tenants' checks: a public name that
/// resolves to an address inside the cluster reaches nothing (checked where the connection is
/// made, so a name cannot resolve one way when checked and another when used).
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found.into_iter().filter(|a| !is_private(a.ip())).collect();
            if public.is_empty() {
                return Err(private_refusal(&host).into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The resolver a check's client uses: [`PublicOnly`] for tenants' checks, unless a proxy is
/// configured (then the proxy makes the connection, and is where egress is limited).
pub fn resolver(public_only: bool) -> Option<Arc<PublicOnly>> {
    let proxied = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    (public_only && !proxied).then(|| Arc::new(PublicOnly))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_are_suffixes_at_label_boundaries() {
        let reach = Reach { allowed_hosts: vec!["azurecr.io".into(), ".example.com".into()], public_only: false };
        assert_eq!(reach.refusal("https", "team.azurecr.io"), None);
        assert_eq!(reach.refusal("https", "azurecr.io:443"), None);
        assert_eq!(reach.refusal("https", "r.EXAMPLE.com."), None);
        assert!(reach.refusal("https", "evilazurecr.io").is_some(), "not at a label boundary");
        assert!(reach.refusal("https", "azurecr.io.evil.example").is_some());
        assert!(reach.refusal("https", "127.0.0.1:5000").is_some());
        assert_eq!(Reach::default().refusal("http", "127.0.0.1:5000"), None, "no limits by default for the platform");
    }

    #[test]
    fn tenants_checks_reach_only_public_addresses_over_https() {
        let tenant = Reach { allowed_hosts: Vec::new(), public_only: true };
        for host in [
            "127.0.0.1:5000",
            "10.0.0.7",
            "192.168.1.1:443",
            "169.254.169.254",
            "100.64.0.1",
            "[::1]:5000",
            "[fd00::1]",
            "[::ffff:10.1.2.3]",
            "0.0.0.0",
        ] {
            assert!(tenant.refusal("https", host).is_some(), "{host}");
        }
        assert_eq!(tenant.refusal("https", "8.8.8.8"), None);
        assert_eq!(tenant.refusal("https", "registry.example.com:5000"), None, "names are checked when resolved");
        assert!(tenant.refusal("http", "registry.example.com").is_some(), "plain HTTP");
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_private_addresses_resolves_to_nothing() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let error = PublicOnly.resolve(name).await.err().expect("localhost is loopback only");
        assert!(error.to_string().contains("private, loopback or link-local"), "{error}");
    }
}
