//! Where Azure tokens may go: the registry hosts (by suffix, `--acr-registry-suffixes`) and
//! the Microsoft Entra authorities (the public and sovereign clouds', and those the controller
//! is told of with `--azure-authority-host`). Pure functions.

/// The registry suffixes Azure tokens may be sent to unless the controller is told otherwise:
/// the public cloud's and the sovereign clouds' (Azure China, Azure Government).
pub const DEFAULT_REGISTRY_SUFFIXES: &[&str] = &[".azurecr.io", ".azurecr.cn", ".azurecr.us"];

/// The public cloud's authority.
pub const PUBLIC_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Azure China's authority.
pub const CHINA_AUTHORITY: &str = "https://login.chinacloudapi.cn";
/// Azure Government's authority.
pub const GOVERNMENT_AUTHORITY: &str = "https://login.microsoftonline.us";

/// The resource (audience) of ACR's own scope, the same in every cloud.
pub const CONTAINER_REGISTRY_RESOURCE: &str = "https://containerregistry.azure.net/";

/// Whether `host` (a host name, no port) lies under one of `suffixes`, at a label boundary:
/// `.azurecr.io` and `azurecr.io` both allow `team.azurecr.io`, neither allows
/// `azurecr.io` itself nor `evilazurecr.io`.
pub fn registry_allowed(host: &str, suffixes: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    if host.is_empty() || host.contains([':', '/', '@', '?', '#']) {
        return false;
    }
    suffixes.iter().any(|suffix| {
        let suffix = suffix.trim().trim_start_matches('.').to_ascii_lowercase();
        !suffix.is_empty()
            && host.len() > suffix.len() + 1
            && host.ends_with(&suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
    })
}

/// The authority of the registry's cloud, when the source names none.
pub fn default_authority(registry: &str) -> &'static str {
    let registry = registry.to_ascii_lowercase();
    if registry.ends_with(".azurecr.cn") {
        CHINA_AUTHORITY
    } else if registry.ends_with(".azurecr.us") {
        GOVERNMENT_AUTHORITY
    } else {
        PUBLIC_AUTHORITY
    }
}

/// An authority as compared and used: without trailing `/`, scheme and host in lowercase.
pub fn normalize_authority(authority: &str) -> String {
    authority.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Whether regcred may send client secrets and assertions to `authority` (normalized): one of
/// the three clouds' own, or one the controller was told of.
pub fn authority_allowed(authority: &str, extra: &[String]) -> bool {
    [PUBLIC_AUTHORITY, CHINA_AUTHORITY, GOVERNMENT_AUTHORITY].contains(&authority)
        || extra.iter().any(|allowed| normalize_authority(allowed) == authority)
}

/// The Azure Resource Manager resource of the authority's cloud.
pub fn resource_manager(authority: &str) -> &'static str {
    match authority {
        CHINA_AUTHORITY => "https://management.chinacloudapi.cn/",
        GOVERNMENT_AUTHORITY => "https://management.usgovcloudapi.net/",
        _ => "https://management.azure.com/",
    }
}

/// Whether `text` is a GUID (an application or tenant id).
pub fn is_guid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Whether `text` names a tenant as the token endpoint's path takes it: its id, or a domain
/// (`contoso.onmicrosoft.com`). Anything else (a `/`, `..`) could change the path.
pub fn is_tenant(text: &str) -> bool {
    if is_guid(text) {
        return true;
    }
    let labels: Vec<&str> = text.split('.').collect();
    text.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Vec<String> {
        DEFAULT_REGISTRY_SUFFIXES.iter().map(|s| s.to_string()).collect()
    }

    /// Item: a credential cannot make regcred hand an Azure token to another host.
    #[test]
    fn only_hosts_under_the_suffixes_are_allowed() {
        for host in ["team.azurecr.io", "Team.AzureCR.io", "reg.azurecr.cn", "reg.azurecr.us", "a.b.azurecr.io"] {
            assert!(registry_allowed(host, &defaults()), "{host}");
        }
        for host in [
            "azurecr.io",
            "evilazurecr.io",
            "team.azurecr.io.evil.com",
            "team.azurecr.io:443",
            "ghcr.io",
            "team.azurecr.io/x",
            "",
        ] {
            assert!(!registry_allowed(host, &defaults()), "{host}");
        }
        let custom = vec!["azurecr.example".to_string()];
        assert!(registry_allowed("team.azurecr.example", &custom));
        assert!(!registry_allowed("team.azurecr.io", &custom));
        assert!(!registry_allowed("team.azurecr.io", &[]), "no suffix allows nothing");
        assert!(!registry_allowed("team.azurecr.io", &[".".to_string()]), "a bare dot allows nothing");
    }

    #[test]
    fn each_cloud_has_its_authority_and_resource_manager() {
        assert_eq!(default_authority("a.azurecr.io"), PUBLIC_AUTHORITY);
        assert_eq!(default_authority("a.azurecr.cn"), CHINA_AUTHORITY);
        assert_eq!(default_authority("a.azurecr.us"), GOVERNMENT_AUTHORITY);
        assert_eq!(resource_manager(PUBLIC_AUTHORITY), "https://management.azure.com/");
        assert_eq!(resource_manager(CHINA_AUTHORITY), "https://management.chinacloudapi.cn/");
        assert_eq!(resource_manager(GOVERNMENT_AUTHORITY), "https://management.usgovcloudapi.net/");
    }

    #[test]
    fn authorities_are_the_clouds_or_those_the_flag_names() {
        let extra = vec!["http://127.0.0.1:8443/".to_string()];
        assert!(authority_allowed(&normalize_authority("https://login.microsoftonline.com/"), &[]));
        assert!(authority_allowed(&normalize_authority("HTTPS://login.chinacloudapi.cn"), &[]));
        assert!(!authority_allowed(&normalize_authority("https://login.evil.example"), &[]));
        assert!(!authority_allowed(&normalize_authority("http://127.0.0.1:8443"), &[]));
        assert!(authority_allowed(&normalize_authority("http://127.0.0.1:8443"), &extra));
        assert!(!authority_allowed(&normalize_authority("http://login.microsoftonline.com"), &[]), "plain HTTP");
    }

    #[test]
    fn tenants_and_guids() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("72f988bf_86f1-41af-91ab-2d7cd011db47"));
        assert!(is_tenant("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(is_tenant("contoso.onmicrosoft.com"));
        for bad in ["../x", "a/b.com", "contoso", "-a.com", "a..com", "a.com/", ""] {
            assert!(!is_tenant(bad), "{bad}");
        }
    }
}
