//! `WWW-Authenticate` challenges (RFC 9110 §11.6.1), as registries send them on a 401:
//! `Basic realm="…"`, `Bearer realm="…",service="…",scope="…"`, several in one header. A small
//! parser: the crates for it target old `http` versions, and this one is fuzzed below.

use std::collections::BTreeMap;

/// One challenge: the scheme (lowercase) and its parameters (names lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Every challenge in a header value, in order. Malformed parts are skipped, never fatal.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut cursor = Cursor { text: header, pos: 0 };
    let mut challenges = Vec::new();
    loop {
        cursor.skip(|c| c == ',' || c == ' ' || c == '\t');
        let Some(scheme) = cursor.token() else {
            // Not a token: skip one character and look again (garbage between challenges).
            if cursor.bump().is_none() {
                break;
            }
            continue;
        };
        let mut challenge = Challenge { scheme: scheme.to_ascii_lowercase(), params: BTreeMap::new() };
        // Parameters follow until something that is not `name=value` (the next scheme).
        loop {
            let before = cursor.pos;
            cursor.skip(|c| c == ' ' || c == '\t' || c == ',');
            let Some(name) = cursor.token() else {
                cursor.pos = before;
                break;
            };
            cursor.skip(|c| c == ' ' || c == '\t');
            if !cursor.eat('=') {
                cursor.pos = before;
                break;
            }
            cursor.skip(|c| c == ' ' || c == '\t');
            let value = if cursor.eat('"') { cursor.quoted() } else { cursor.token().map(String::from) };
            match value {
                Some(value) => {
                    challenge.params.insert(name.to_ascii_lowercase(), value);
                }
                // `token68` (`Basic abc==`) or garbage: keep the scheme, drop the rest of it.
                None => cursor.skip(|c| c != ','),
            }
        }
        challenges.push(challenge);
    }
    challenges
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.rest().chars().next()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, wanted: char) -> bool {
        match self.rest().starts_with(wanted) {
            true => {
                self.pos += wanted.len_utf8();
                true
            }
            false => false,
        }
    }

    fn skip(&mut self, while_: impl Fn(char) -> bool) {
        let skipped: usize = self.rest().chars().take_while(|c| while_(*c)).map(char::len_utf8).sum();
        self.pos += skipped;
    }

    /// An RFC 9110 `token`.
    fn token(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let len: usize = rest.chars().take_while(|c| is_tchar(*c)).map(char::len_utf8).sum();
        (len > 0).then(|| {
            self.pos += len;
            &rest[..len]
        })
    }

    /// The rest of a `quoted-string` after its opening quote, unescaped. An unterminated one
    /// runs to the end.
    fn quoted(&mut self) -> Option<String> {
        let mut value = String::new();
        while let Some(c) = self.bump() {
            match c {
                '"' => return Some(value),
                '\\' => value.extend(self.bump()),
                c => value.push(c),
            }
        }
        Some(value)
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn registries_challenges_parse() {
        // distribution (htpasswd), ECR, Docker Hub, GHCR, Artifact Registry, Quay.
        assert_eq!(parse(r#"Basic realm="basic-realm""#), [challenge("basic", &[("realm", "basic-realm")])]);
        assert_eq!(
            parse(r#"Basic realm="https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/",service="ecr.amazonaws.com""#),
            [challenge(
                "basic",
                &[("realm", "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/"), ("service", "ecr.amazonaws.com")]
            )]
        );
        assert_eq!(
            parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#
            ),
            [challenge(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/nginx:pull")
                ]
            )]
        );
        assert_eq!(
            parse(r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull""#)[0]
                .param("service"),
            Some("ghcr.io")
        );
        assert_eq!(
            parse(r#"Bearer realm="https://europe-docker.pkg.dev/v2/token",service="europe-docker.pkg.dev""#)[0]
                .param("realm"),
            Some("https://europe-docker.pkg.dev/v2/token")
        );
        // distribution with token auth after a denied scope.
        let denied = parse(
            r#"Bearer realm="http://127.0.0.1:5001/token/",service="registry",scope="repository:other/app:pull",error="insufficient_scope""#,
        );
        assert_eq!(denied[0].param("error"), Some("insufficient_scope"));
    }

    #[test]
    fn several_challenges_unquoted_values_escapes_and_case() {
        assert_eq!(
            parse(r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#),
            [
                challenge("newauth", &[("realm", "apps"), ("type", "1"), ("title", "Login to \"apps\"")]),
                challenge("basic", &[("realm", "simple")]),
            ]
        );
        assert_eq!(parse("BEARER Realm=x"), [challenge("bearer", &[("realm", "x")])]);
        assert_eq!(
            parse("Negotiate, Basic realm=r"),
            [challenge("negotiate", &[]), challenge("basic", &[("realm", "r")])]
        );
        assert_eq!(parse("Basic dXNlcjpwYXNz=="), [challenge("basic", &[])]);
        assert_eq!(parse(""), []);
        assert_eq!(parse(r#"Bearer realm="unterminated"#), [challenge("bearer", &[("realm", "unterminated")])]);
    }

    fn render(challenges: &[Challenge]) -> String {
        let one = |c: &Challenge| {
            let params: Vec<String> = c
                .params
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            format!("{} {}", c.scheme, params.join(", "))
        };
        challenges.iter().map(one).collect::<Vec<_>>().join(", ")
    }

    proptest! {
        /// Whatever a server sends, parsing ends without a panic.
        #[test]
        fn any_header_parses_without_panic(header in any::<String>()) {
            let _ = parse(&header);
        }

        /// Well-formed challenges, with any parameter values, read back exactly.
        #[test]
        fn rendered_challenges_read_back(
            challenges in prop::collection::vec(
                ("[a-z][a-z0-9-]{0,8}", prop::collection::btree_map("[a-z][a-z0-9_]{0,8}", "[ -~]{0,40}", 1..4)),
                1..4,
            )
        ) {
            let challenges: Vec<Challenge> =
                challenges.into_iter().map(|(scheme, params)| Challenge { scheme, params }).collect();
            prop_assert_eq!(parse(&render(&challenges)), challenges);
        }
    }
}
