//! The kubelet's pull-credential lookup, in Rust: which `.dockerconfigjson` entries a Pod's
//! pull of an image sends. A port of k8s.io/kubernetes `pkg/util/parsers.ParseImageName` (the
//! image normalised as docker does) and `pkg/credentialprovider` (`BasicDockerKeyring.Add`,
//! `Lookup`, `URLsMatch`); `tests/keyring.rs` compares it with that Go code, run by
//! `keyring-lookup`, entry by entry. Pure.

/// An image reference, normalised as the kubelet does before a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`: the registry as the image names it.
    pub domain: String,
    /// The repository within it: `library/nginx`, `org/app`.
    pub path: String,
    /// The tag, or the digest when the image names one (`latest` when it names neither).
    pub reference: String,
}

impl ImageRef {
    /// What the kubelet looks credentials up with: `docker.io/library/nginx`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The host a pull connects to: Docker Hub's images come from `registry-1.docker.io`.
    pub fn pull_host(&self) -> &str {
        match self.domain.as_str() {
            DOCKER_HUB_DOMAIN => "registry-1.docker.io",
            domain => domain,
        }
    }
}

const DOCKER_HUB_DOMAIN: &str = "docker.io";
/// Where the keyring files Docker Hub's `https://index.docker.io/v1/` entry, and what it falls
/// back to for Docker Hub images.
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// Why an image name is not a reference the kubelet would pull.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{image:?} is not a valid image reference: {problem}")]
pub struct BadImage {
    pub image: String,
    pub problem: &'static str,
}

/// Parses and normalises `image` as docker's `ParseNormalizedNamed` does: a first component
/// with a `.` or `:`, or `localhost`, is the registry; otherwise the image is Docker Hub's
/// (`library/` added to a single name).
pub fn parse_image(image: &str) -> Result<ImageRef, BadImage> {
    let bad = |problem| BadImage { image: image.to_string(), problem };
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) if digest.contains(':') => (name, Some(digest)),
        Some(_) => return Err(bad("the digest is not algorithm:hex")),
        None => (image, None),
    };
    let (name, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    if tag.is_some_and(|t| t.is_empty() || t.len() > 128 || !t.bytes().all(is_tag_byte)) {
        return Err(bad("invalid tag"));
    }
    let (domain, path) = split_domain(name);
    if domain.is_empty() || path.is_empty() || !path.split('/').all(valid_path_component) {
        return Err(bad("invalid repository name (lower-case letters, digits and separators)"));
    }
    let reference = digest.or(tag).unwrap_or("latest").to_string();
    Ok(ImageRef { domain, path, reference })
}

fn is_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

fn split_domain(name: &str) -> (String, String) {
    let (domain, rest) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" || first != first.to_lowercase() => {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == DEFAULT_REGISTRY_HOST { DOCKER_HUB_DOMAIN.to_string() } else { domain };
    let path = if domain == DOCKER_HUB_DOMAIN && !rest.contains('/') { format!("library/{rest}") } else { rest };
    (domain, path)
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        && !component.contains("..")
        && !component.contains("___")
        && !component.contains(".-")
        && !component.contains("-.")
}

/// The key the keyring files a `.dockerconfigjson` server under (`BasicDockerKeyring.Add`): the
/// scheme dropped, a `/v1/` or `/v2/` path counted as none. `None`: the kubelet ignores it (an
/// entry Go's URL parser refuses, such as a port that is not a number).
pub fn entry_key(server: &str) -> Option<String> {
    let rest = server.strip_prefix("https://").or_else(|| server.strip_prefix("http://")).unwrap_or(server);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !valid_host(host) {
        return None;
    }
    let path = if path.starts_with("/v2/") || path.starts_with("/v1/") { &path[3..] } else { path };
    Some(if path.is_empty() || path == "/" { host.to_string() } else { format!("{host}{path}") })
}

/// What Go's URL parser accepts as a host: no spaces, and a port, if any, of digits.
fn valid_host(host: &str) -> bool {
    if host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return false;
    }
    match split_host_port(host) {
        (_, Some(port)) => port.bytes().all(|b| b.is_ascii_digit()),
        (name, None) => !name.ends_with(':'),
    }
}

/// `net.SplitHostPort`, leniently: (`name`, port) or the whole host without a port.
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
    }
    match host.split_once(':') {
        Some((name, port)) if !port.contains(':') => (name, Some(port)),
        _ => (host, None),
    }
}

/// Whether the keyring's `key` matches `repository` (`URLsMatch`): the same port, as many host
/// labels each matching as a glob (`*.example.com`), and the key's path a prefix of the
/// repository's.
pub fn key_matches(key: &str, repository: &str) -> bool {
    let (glob_host, glob_path) = split_path(key);
    let (target_host, target_path) = split_path(repository);
    let (glob_name, glob_port) = split_host_port(glob_host);
    let (target_name, target_port) = split_host_port(target_host);
    let glob_parts: Vec<&str> = glob_name.split('.').collect();
    let target_parts: Vec<&str> = target_name.split('.').collect();
    glob_port == target_port
        && glob_parts.len() == target_parts.len()
        && target_path.starts_with(glob_path)
        && glob_parts.iter().zip(&target_parts).all(|(g, t)| glob_match(g.as_bytes(), t.as_bytes()))
}

fn split_path(url: &str) -> (&str, &str) {
    match url.find('/') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    }
}

/// Go's `filepath.Match` on one host label: `*`, `?`, `[…]` classes (`^` negates) and `\`
/// escapes. A malformed pattern matches nothing.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob_match(rest, &text[i..])),
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((b'[', rest)) => match (class_match(rest, text.first().copied()), text.is_empty()) {
            (Some((true, after)), false) => glob_match(after, &text[1..]),
            _ => false,
        },
        Some((b'\\', rest)) => match rest.split_first() {
            Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
            None => false,
        },
        Some((c, rest)) => text.first() == Some(c) && glob_match(rest, &text[1..]),
    }
}

/// A `[…]` class after its `[`: whether `c` is in it, and the pattern after its `]`.
fn class_match(pattern: &[u8], c: Option<u8>) -> Option<(bool, &[u8])> {
    let c = c?;
    let (negated, mut rest) = match pattern.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, pattern),
    };
    let mut found = false;
    let mut first = true;
    loop {
        match rest {
            [b']', after @ ..] if !first => return Some((found != negated, after)),
            [lo, b'-', hi, after @ ..] if *hi != b']' => {
                found |= (*lo..=*hi).contains(&c);
                rest = after;
            }
            [x, after @ ..] => {
                found |= *x == c;
                rest = after;
            }
            [] => return None,
        }
        first = false;
    }
}

/// One entry of one pull Secret, as the keyring holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub secret: &'a str,
    pub server: &'a str,
}

/// The entries the kubelet sends for `repository`, in the order it tries them (keys
/// reverse-sorted, so `quay.io/org` before `quay.io`), with Docker Hub's fallback to the
/// `index.docker.io` key when no key matched.
pub fn lookup<'a>(entries: &[Entry<'a>], repository: &str) -> Vec<Entry<'a>> {
    let mut keyed: Vec<(String, &Entry<'a>)> =
        entries.iter().filter_map(|e| entry_key(e.server).map(|k| (k, e))).collect();
    // Stable: entries under one key keep the order of the Secrets.
    keyed.sort_by(|a, b| b.0.cmp(&a.0));
    let matched: Vec<Entry<'a>> =
        keyed.iter().filter(|(k, _)| key_matches(k, repository)).map(|(_, e)| (*e).clone()).collect();
    if !matched.is_empty() || !is_default_registry_match(repository) {
        return matched;
    }
    keyed.iter().filter(|(k, _)| k == DEFAULT_REGISTRY_HOST).map(|(_, e)| (*e).clone()).collect()
}

/// Whether the keyring counts `repository` as Docker Hub's (`isDefaultRegistryMatch`).
fn is_default_registry_match(repository: &str) -> bool {
    match repository.split_once('/') {
        None => !repository.is_empty(),
        Some(("", _)) => false,
        Some((first, _)) => first == DOCKER_HUB_DOMAIN || first == DEFAULT_REGISTRY_HOST || !first.contains(['.', ':']),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(image: &str) -> (String, String) {
        let r = parse_image(image).unwrap();
        (r.repository(), r.reference)
    }

    #[test]
    fn images_are_normalised_as_docker_does() {
        assert_eq!(parsed("nginx"), ("docker.io/library/nginx".into(), "latest".into()));
        assert_eq!(parsed("org/app:1.2"), ("docker.io/org/app".into(), "1.2".into()));
        assert_eq!(parsed("index.docker.io/org/app"), ("docker.io/org/app".into(), "latest".into()));
        assert_eq!(parsed("ghcr.io/org/app:v1"), ("ghcr.io/org/app".into(), "v1".into()));
        assert_eq!(parsed("localhost/app"), ("localhost/app".into(), "latest".into()));
        assert_eq!(parsed("127.0.0.1:5000/team/app:1"), ("127.0.0.1:5000/team/app".into(), "1".into()));
        let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(parsed(&format!("ghcr.io/org/app:v1@{digest}")).1, digest);
        assert_eq!(parse_image("ghcr.io:443/org/app").unwrap().domain, "ghcr.io:443");
    }

    #[test]
    fn bad_images_are_refused() {
        for bad in ["", "Org/App", "ghcr.io/", "ghcr.io/org/app:", "ghcr.io/org//app", "a@b"] {
            assert!(parse_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_drop_the_scheme_and_version_paths() {
        assert_eq!(entry_key("https://index.docker.io/v1/").as_deref(), Some("index.docker.io"));
        assert_eq!(entry_key("ghcr.io").as_deref(), Some("ghcr.io"));
        assert_eq!(entry_key("http://ghcr.io:443/v2/").as_deref(), Some("ghcr.io:443"));
        assert_eq!(entry_key("quay.io/org").as_deref(), Some("quay.io/org"));
        assert_eq!(entry_key("ghcr.io:abc"), None);
    }

    #[test]
    fn matching_needs_the_same_port_labels_and_path_prefix() {
        assert!(key_matches("ghcr.io", "ghcr.io/org/app"));
        assert!(!key_matches("ghcr.io:443", "ghcr.io/org/app"));
        assert!(!key_matches("ghcr.io", "ghcr.io:443/org/app"));
        assert!(key_matches("*.example.com", "reg.example.com/app"));
        assert!(!key_matches("*.example.com", "example.com/app"));
        assert!(key_matches("quay.io/org", "quay.io/org/app"));
        assert!(!key_matches("quay.io/org", "quay.io/other/app"));
        assert!(key_matches("reg[0-9].io", "reg1.io/app"));
        assert!(!key_matches("reg[^0-9].io", "reg1.io/app"));
    }

    #[test]
    fn docker_hub_images_fall_back_to_the_index_key() {
        let entries = [Entry { secret: "s", server: "https://index.docker.io/v1/" }];
        assert_eq!(lookup(&entries, "docker.io/library/nginx").len(), 1);
        assert!(lookup(&entries, "ghcr.io/org/app").is_empty());
        let both = [Entry { secret: "a", server: "quay.io" }, Entry { secret: "b", server: "quay.io/org" }];
        let found = lookup(&both, "quay.io/org/app");
        assert_eq!(found.iter().map(|e| e.secret).collect::<Vec<_>>(), ["b", "a"], "the more specific key first");
    }
}
