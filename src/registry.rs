//! Registry hosts: validation and the server key written into `.dockerconfigjson`.

use crate::Error;

/// The key `docker login` writes for Docker Hub and the kubelet matches it against.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Validates a `host[:port]` and returns the server key for it.
///
/// The apiserver already enforces the same syntax through the CRD schema; this check is
/// repeated here because `regcred render` runs without an apiserver.
pub fn server_key(registry: &str) -> Result<String, Error> {
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
        return Ok(DOCKER_HUB_SERVER.to_string());
    }
    Ok(match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
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
    fn docker_hub_aliases_share_one_key() {
        for alias in ["docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO"] {
            assert_eq!(server_key(alias).unwrap(), DOCKER_HUB_SERVER, "{alias}");
        }
    }

    #[test]
    fn hosts_and_ports_are_kept() {
        assert_eq!(server_key("ghcr.io").unwrap(), "ghcr.io");
        assert_eq!(server_key("Registry.Example.com:5000").unwrap(), "registry.example.com:5000");
        assert_eq!(server_key("127.0.0.1:5000").unwrap(), "127.0.0.1:5000");
        assert_eq!(server_key("[::1]:5000").unwrap(), "[::1]:5000");
        assert_eq!(server_key("localhost").unwrap(), "localhost");
        // A port on a Docker Hub alias is another registry.
        assert_eq!(server_key("docker.io:443").unwrap(), "docker.io:443");
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
            let err = server_key(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidRegistry { .. }), "{bad}: {err}");
        }
    }
}
