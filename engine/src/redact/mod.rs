//! Secret redaction, the one home for its rules: which forms of a secret value are searched
//! ([`encodings`]), which secrets are recognised by their shape ([`shapes`]), the matcher that
//! replaces both ([`matcher`]), the placeholder format and the list of credential headers.
//! Pure: no I/O. The evidence crate drives the matcher over streams and files (holding back
//! what a secret cut between two reads needs); steps, the console and the engine's own
//! messages call it on text.

pub mod encodings;
pub mod matcher;
pub mod shapes;

pub use encodings::{variants, MIN_SECRET_LINE, NOT_SEARCHED, SEARCHED_FORMS};
pub use matcher::{ends_wrapped, lead_at, next_lead, ByteRedactor, MIN_SECRET, WRAP_MIN};
pub use shapes::{key_marker, PemFilter, ShapeRules, KEY_BEGIN, KEY_END};

/// What replaces a secret known by name (a param, a `secret()`, a shape rule) everywhere runbook
/// writes: `[REDACTED:<name>]`.
pub fn placeholder(name: &str) -> String {
    format!("[REDACTED:{name}]")
}

/// What replaces a credential that has no name: one a step finds itself (a header's value, the
/// password in a URL) in its own transcript, before evidence sees it.
pub const UNNAMED_PLACEHOLDER: &str = "<redacted>";

/// Request and response headers whose values are credentials whatever they contain. Steps
/// that show headers (http, screenshot) hide these values and search the rest of their output
/// for them.
pub fn is_credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || (!n.ends_with("authenticate")
        && ["token", "key", "secret", "auth", "password"]
            .iter()
            .any(|w| n.contains(w)))
}

/// The credentials a request carries that a step must keep out of its own transcript (and out
/// of what a server echoes back): each credential header's whole value and, for
/// `Scheme credential` values (`Bearer …`, `Basic <base64>`), the credential alone; and the
/// password of the URL. One rule for every step that sends requests (http, screenshot).
pub fn request_credentials<'a>(
    url_password: Option<&str>,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |v: &str| {
        let v = v.trim();
        if !v.is_empty() && !out.iter().any(|s| s == v) {
            out.push(v.to_owned());
        }
    };
    if let Some(pw) = url_password {
        add(pw);
    }
    for (name, value) in headers {
        if is_credential_header(name) {
            if let Some((_, credential)) = value.split_once(' ') {
                add(credential);
            }
            add(value);
        }
    }
    out
}

/// The engine's view of the run's secrets, for text it produces itself (commands, messages,
/// failure reasons): every searched form of each value is replaced by its placeholder. Shapes
/// are left to the evidence writer and the console, which see this text again.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// (name, value), longest value first.
    secrets: Vec<(String, String)>,
    matcher: ByteRedactor,
}

impl Redactor {
    pub fn new(mut secrets: Vec<(String, String)>) -> Self {
        // Too short to redact without mangling ordinary text (see `MIN_SECRET`).
        secrets.retain(|(_, v)| v.len() >= MIN_SECRET);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
        let matcher = ByteRedactor::new(&secrets).with_shapes(ShapeRules::none());
        Self { secrets, matcher }
    }

    pub fn secrets(&self) -> &[(String, String)] {
        &self.secrets
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    pub fn redact_str(&self, text: &str) -> String {
        if self.secrets.is_empty() {
            return text.to_owned();
        }
        self.matcher.redact_str(text)
    }
}

/// Whether the line after `previous` may be the end of base64 text wrapped over lines:
/// `previous` ends in at least 64 base64 characters (GNU `base64` wraps at 76 columns,
/// `openssl base64` at 64). Used to keep the last line of such output out of a failure
/// reason: a line on its own holds only a piece of an encoding, which no redactor can
/// recognise.
pub fn continues_wrapped_base64(previous: &str) -> bool {
    previous
        .trim_end_matches('\r')
        .bytes()
        .rev()
        .take_while(|b| b.is_ascii_alphanumeric() || b"+/-_".contains(b))
        .count()
        >= 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_base64_is_recognised_by_the_line_before() {
        let full = "bG9uZy1zZWNyZXQvd2l0aCtzcGVjaWFsIGNoYXJzJj0/fiBhbmQgbW9yZSB0ZXh0IHRvIGV4Y2Vl";
        assert!(continues_wrapped_base64(full));
        assert!(continues_wrapped_base64(&format!("{}\r", &full[..64])));
        assert!(!continues_wrapped_base64(&full[..63]));
        assert!(!continues_wrapped_base64(
            "FAIL os: expected Rocky Linux 9.x; found Debian 12"
        ));
    }

    #[test]
    fn one_credential_header_list() {
        for h in [
            "Authorization",
            "proxy-authorization",
            "Cookie",
            "Set-Cookie",
            "X-Api-Key",
            "X-Auth-Token",
            "PRIVATE-TOKEN",
            "X-Vault-Token",
            "X-Client-Secret",
        ] {
            assert!(is_credential_header(h), "{h}");
        }
        for h in ["Accept", "Content-Type", "WWW-Authenticate", "Location"] {
            assert!(!is_credential_header(h), "{h}");
        }
    }

    #[test]
    fn the_engine_redactor_uses_the_shared_matcher() {
        let r = Redactor::new(vec![
            ("short".into(), "abc".into()),
            ("pw".into(), "hunter2-secret".into()),
        ]);
        assert_eq!(r.secrets().len(), 1, "values under MIN_SECRET are dropped");
        assert_eq!(
            r.redact_str("run --pw hunter2-secret abc"),
            "run --pw [REDACTED:pw] abc"
        );
        // An encoded form is found too (hex, as `xxd -p` prints it).
        assert_eq!(
            r.redact_str(&format!("x {} y", hex::encode("hunter2-secret"))),
            "x [REDACTED:pw] y"
        );
        // Shapes are the evidence writer's and the console's business.
        assert_eq!(
            r.redact_str("Authorization: Bearer abcdefgh1234"),
            "Authorization: Bearer abcdefgh1234"
        );
    }

    #[test]
    fn request_credentials_take_whole_values_the_credential_alone_and_the_url_password() {
        let got = request_credentials(
            Some("url-pw"),
            [
                ("Authorization", "Bearer tok-123"),
                ("X-Api-Key", "k-456"),
                ("Accept", "text/html"),
                ("Cookie", ""),
            ],
        );
        assert_eq!(got, ["url-pw", "tok-123", "Bearer tok-123", "k-456"]);
    }
}
