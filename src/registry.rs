//! Registry hosts: validation and the server keys written into `.dockerconfigjson`.

use crate::Error;

/// The key `docker login` writes for Docker Hub. The docker CLI looks it up for every image
/// it counts as Docker Hub (`nginx`, `docker.io/…`, `index.docker.io/…`), and so does the
/// kubelet: its keyring files this key under `index.docker.io`, the host it falls back to
/// for those images.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

/// Docker Hub's registry host, which an image may also name (`registry-1.docker.io/org/app`).
/// Neither the kubelet nor the docker CLI counts that spelling as Docker Hub: both look its
/// credential up under this host, so it gets a key of its own.
pub const DOCKER_HUB_REGISTRY_HOST: &str = "registry-1.docker.io";

const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", DOCKER_HUB_REGISTRY_HOST];

/// Validates a `host[:port]` and returns the server keys to write for it, sorted: the host
/// itself, or for Docker Hub (any of its spellings) [`DOCKER_HUB_SERVER`] and
/// [`DOCKER_HUB_REGISTRY_HOST`], so that every spelling of a Docker Hub image finds the login.
///
/// The apiserver already enforces the same syntax through the CRD schema; this check is
/// repeated here because `regcred render` runs without an apiserver.
pub fn server_keys(registry: &str) -> Result<Vec<String>, Error> {
    let invalid = |problem: &str| Error::InvalidRegistry { host: registry.to_string(), problem: problem.to_string() };
    if registry.contains("://") {
        return Err(invalid("give the host without a scheme, e.g. ghcr.io"));
    }
    if registry.contains('/') {
        return Err(invalid("give the host without a path, e.g. ghcr.io"));
    }
    let (host, port) = split_port(registry).ok_or_else(|| invalid("port must be a number from 1 to 65535"))?;
    if !(is_dns_name(host) || is_bracketed_ipv6(host)) {
        return Err(invalid("not a valid host name"));
    }
    let host = host.to_ascii_lowercase();
    if port.is_none() && DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        // Already in sorted order.
        return Ok(vec![DOCKER_HUB_SERVER.to_string(), DOCKER_HUB_REGISTRY_HOST.to_string()]);
    }
    Ok(vec![match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }])
}

/// Splits `host[:port]`; `None` when the port is present but not 1..=65535.
fn split_port(registry: &str) -> Option<(&str, Option<u16>)> {
    let port_sep = match registry.rfind(':') {
        // The colons inside `[::1]` are not a port separator.
        Some(i) if !registry[i..].contains(']') => i,
        _ => return Some((registry, None)),
    };
    let port: u16 = registry[port_sep + 1..].parse().ok()?;
    (port != 0 && !registry[port_sep + 1..].starts_with('+')).then_some((&registry[..port_sep], Some(port)))
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_bracketed_ipv6(host: &str) -> bool {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_spellings_all_get_the_index_key_and_the_registry_host() {
        for alias in ["docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO", "REGISTRY-1.docker.io"] {
            assert_eq!(server_keys(alias).unwrap(), ["https://index.docker.io/v1/", "registry-1.docker.io"], "{alias}");
        }
    }

    #[test]
    fn keys_are_sorted() {
        let keys = server_keys("docker.io").unwrap();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn other_hosts_keep_one_key_with_their_port() {
        assert_eq!(server_keys("ghcr.io").unwrap(), ["ghcr.io"]);
        assert_eq!(server_keys("Registry.Example.com:5000").unwrap(), ["registry.example.com:5000"]);
        assert_eq!(server_keys("127.0.0.1:5000").unwrap(), ["127.0.0.1:5000"]);
        assert_eq!(server_keys("[::1]:5000").unwrap(), ["[::1]:5000"]);
        assert_eq!(server_keys("localhost").unwrap(), ["localhost"]);
        // A port on a Docker Hub spelling is another registry.
        assert_eq!(server_keys("docker.io:443").unwrap(), ["docker.io:443"]);
        assert_eq!(server_keys("registry-1.docker.io:443").unwrap(), ["registry-1.docker.io:443"]);
        // Not Docker Hub, though under docker.io.
        assert_eq!(server_keys("hub.docker.io").unwrap(), ["hub.docker.io"]);
    }

    #[test]
    fn bad_hosts_are_rejected_with_a_reason() {
        for bad in [
            "https://ghcr.io",
            "ghcr.io/org",
            "",
            "ghcr.io:0",
            "ghcr.io:65536",
            "ghcr.io:+1",
            "ghcr.io:",
            "-bad.example.com",
            "bad..example.com",
            "spa ce.io",
            "[not-ipv6]",
        ] {
            let err = server_keys(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidRegistry { .. }), "{bad}: {err}");
        }
    }
}
