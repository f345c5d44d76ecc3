//! ECR registry hosts: `<account>.dkr.ecr[-fips].<region>.<partition suffix>`.

/// What an ECR registry host says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrHost {
    pub account_id: String,
    pub region: String,
    pub fips: bool,
}

/// Domain suffixes of the AWS partitions that serve ECR.
const PARTITION_SUFFIXES: [&str; 6] =
    ["amazonaws.com", "amazonaws.com.cn", "on.aws", "c2s.ic.gov", "sc2s.sgov.gov", "cloud.adc-e.uk"];

/// The schema pattern of `source.ecr.registry` (in the CRDs): exactly the hosts
/// [`parse_ecr_host`] accepts, in any letter case as it does, so a host the controller would
/// refuse is refused at admission instead. Built from the same partition suffixes.
pub fn ecr_host_pattern() -> String {
    let any_case = |word: &str| -> String {
        word.chars()
            .map(|c| match c {
                'a'..='z' => format!("[{}{c}]", c.to_ascii_uppercase()),
                '.' => r"\.".to_string(),
                c => c.to_string(),
            })
            .collect()
    };
    let services = ["dkr.ecr", "dkr.ecr-fips", "dkr-ecr"].map(any_case).join("|");
    let suffixes = PARTITION_SUFFIXES.map(any_case).join("|");
    format!(r"^[0-9]{{12}}\.({services})\.[A-Za-z0-9-]+\.({suffixes})$")
}

/// Parses an ECR registry host, or says why it is not one.
pub fn parse_ecr_host(host: &str) -> Result<EcrHost, String> {
    const SHAPE: &str = "expected <account>.dkr.ecr.<region>.amazonaws.com (or .amazonaws.com.cn, dkr.ecr-fips)";
    let host = host.to_ascii_lowercase();
    let (account_id, rest) = host.split_once('.').ok_or(SHAPE)?;
    if account_id.len() != 12 || !account_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the account id must be 12 digits; {SHAPE}"));
    }
    let (service, rest) = rest.split_once('.').ok_or(SHAPE)?;
    let (service, rest) = match service {
        // Dual-stack endpoints are `<account>.dkr-ecr.<region>.on.aws`.
        "dkr-ecr" => ("ecr", rest),
        "dkr" => rest.split_once('.').ok_or(SHAPE)?,
        _ => return Err(SHAPE.into()),
    };
    let fips = match service {
        "ecr" => false,
        "ecr-fips" => true,
        _ => return Err(SHAPE.into()),
    };
    let (region, suffix) = rest.split_once('.').ok_or(SHAPE)?;
    if region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("invalid region {region:?}; {SHAPE}"));
    }
    if !PARTITION_SUFFIXES.contains(&suffix) {
        return Err(format!("{suffix:?} is not an AWS domain; {SHAPE}"));
    }
    Ok(EcrHost { account_id: account_id.into(), region: region.into(), fips })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commercial_china_fips_and_dual_stack_hosts() {
        let parsed = parse_ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(parsed, EcrHost { account_id: "123456789012".into(), region: "eu-west-1".into(), fips: false });
        assert_eq!(parse_ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").unwrap().region, "cn-north-1");
        assert!(parse_ecr_host("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com").unwrap().fips);
        assert_eq!(parse_ecr_host("123456789012.dkr-ecr.us-east-1.on.aws").unwrap().region, "us-east-1");
    }

    #[test]
    fn rejects_other_hosts_with_the_expected_shape() {
        for bad in [
            "ghcr.io",
            "12345678901.dkr.ecr.eu-west-1.amazonaws.com",
            "1234567890123.dkr.ecr.eu-west-1.amazonaws.com",
            "abcdefghijkl.dkr.ecr.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecs.eu-west-1.amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.evil.com",
            "123456789012.dkr.ecr.eu_west.amazonaws.com",
            "123456789012.dkr.ecr..amazonaws.com",
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.com",
            "",
        ] {
            let err = parse_ecr_host(bad).unwrap_err();
            assert!(err.contains("expected <account>"), "{bad}: {err}");
        }
    }

    proptest::proptest! {
        /// Any text: no panic, and anything accepted has the documented shape.
        #[test]
        fn never_panics_and_accepts_only_the_shape(host in "\\PC{0,80}") {
            if let Ok(parsed) = parse_ecr_host(&host) {
                proptest::prop_assert_eq!(parsed.account_id.len(), 12);
                proptest::prop_assert!(host.to_ascii_lowercase().contains(&parsed.region));
            }
        }

        /// Every well-formed host parses back to its parts.
        #[test]
        fn well_formed_hosts_parse_to_their_parts(
            account in "[0-9]{12}", region in "[a-z]{2}(-[a-z]+)?-[0-9]", fips in proptest::prelude::any::<bool>(),
            suffix in proptest::sample::select(PARTITION_SUFFIXES.to_vec()),
        ) {
            let service = if fips { "ecr-fips" } else { "ecr" };
            let parsed = parse_ecr_host(&format!("{account}.dkr.{service}.{region}.{suffix}")).unwrap();
            proptest::prop_assert_eq!(parsed, EcrHost { account_id: account, region, fips });
        }
    }
}
