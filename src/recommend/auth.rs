//! Who may do what: API keys (bearer tokens), each with scopes. The core decides; REST hands it
//! the `Authorization` header and gRPC the `authorization` metadata entry. With no keys
//! configured, authentication is off and every caller may do everything (the default on
//! 127.0.0.1; `serve` warns loudly when it listens elsewhere without keys).
use std::fmt;

use super::CoreError;

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Recommendations, interests, histories, model information.
    Read,
    /// Events and erasure.
    Write,
    /// Operating the service (model reload).
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Read, Self::Write, Self::Admin]
            .into_iter()
            .find(|scope| scope.name() == text)
    }
}

/// The keys the server accepts; tokens are never printed (`Debug` shows only how many).
#[derive(Clone, Default, PartialEq)]
pub struct ApiKeys {
    keys: Vec<(Vec<u8>, Vec<Scope>)>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Shortest token accepted: a guessable key is no key.
pub const MIN_TOKEN_BYTES: usize = 16;

impl ApiKeys {
    /// Entries `TOKEN SCOPE[,SCOPE…]`, one per line or separated by `;`; blank entries and
    /// lines starting with `#` are skipped. Errors name the entry by number, never its token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        let entries = text.split(['\n', ';']).map(str::trim);
        for (number, entry) in entries
            .enumerate()
            .filter(|(_, e)| !e.is_empty() && !e.starts_with('#'))
        {
            let what = format!("API key entry {}", number + 1);
            let (token, scopes) = entry
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("{what}: expected `TOKEN SCOPE[,SCOPE…]`"))?;
            if token.len() < MIN_TOKEN_BYTES {
                return Err(format!("{what}: the token is shorter than {MIN_TOKEN_BYTES} bytes"));
            }
            let scopes = scopes
                .split(',')
                .map(|s| {
                    Scope::parse(s.trim())
                        .ok_or_else(|| format!("{what}: unknown scope `{}` (read, write, admin)", s.trim()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if keys.keys.iter().any(|(known, _)| known == token.as_bytes()) {
                return Err(format!("{what}: the same token is listed twice"));
            }
            keys.keys.push((token.as_bytes().to_vec(), scopes));
        }
        Ok(keys)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Both sets of keys (a file and the environment, say).
    pub fn merged(mut self, other: Self) -> Result<Self, String> {
        for (token, scopes) in other.keys {
            if self.keys.iter().any(|(known, _)| *known == token) {
                return Err("the same API key token is configured twice".into());
            }
            self.keys.push((token, scopes));
        }
        Ok(self)
    }

    /// Whether the caller presenting `authorization` (an `Authorization` value, `Bearer TOKEN`)
    /// may do what needs `scope`.
    pub fn authorize(&self, authorization: Option<&str>, scope: Scope) -> Result<(), CoreError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        // The scheme's name is case-insensitive (RFC 9110), the token is not.
        let token = authorization
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| CoreError::Unauthenticated("an API key is required: `Authorization: Bearer KEY`".into()))?;
        // Every key is compared, in constant time per byte, so that timing tells neither how
        // much of a token matched nor which key did.
        let mut granted: Option<&[Scope]> = None;
        for (key, scopes) in &self.keys {
            if constant_time_eq(key, token.as_bytes()) {
                granted = Some(scopes);
            }
        }
        match granted {
            None => Err(CoreError::Unauthenticated("the API key is not valid".into())),
            Some(scopes) if scopes.contains(&scope) => Ok(()),
            Some(_) => Err(CoreError::Forbidden(scope.name())),
        }
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const READER: &str = "reader-0123456789abcdef";
    const WRITER: &str = "writer-0123456789abcdef";

    fn keys() -> ApiKeys {
        ApiKeys::parse(&format!(
            "# comment\n{READER} read\n\n{WRITER} write, read ; opsopsopsopsopsops admin"
        ))
        .unwrap()
    }

    #[test]
    fn keys_grant_exactly_their_scopes() {
        let keys = keys();
        assert_eq!(keys.len(), 3);
        let bearer = |token: &str| format!("Bearer {token}");
        assert_eq!(keys.authorize(Some(&bearer(READER)), Scope::Read), Ok(()));
        assert_eq!(
            keys.authorize(Some(&bearer(READER)), Scope::Write),
            Err(CoreError::Forbidden("write"))
        );
        assert_eq!(keys.authorize(Some(&bearer(WRITER)), Scope::Write), Ok(()));
        assert_eq!(keys.authorize(Some(&bearer(WRITER)), Scope::Read), Ok(()));
        assert_eq!(
            keys.authorize(Some(&bearer("opsopsopsopsopsops")), Scope::Admin),
            Ok(())
        );
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} {READER}");
            assert_eq!(keys.authorize(Some(&value), Scope::Read), Ok(()), "{value}");
        }
        let upper = format!("Bearer {}", READER.to_uppercase());
        for refused in [
            Some(upper.as_str()),
            Some(&*format!("Bearerx {READER}")),
            None,
            Some("Basic abc"),
            Some("Bearer nope"),
            Some(&*format!("Bearer {READER}x")),
        ] {
            assert!(
                matches!(keys.authorize(refused, Scope::Read), Err(CoreError::Unauthenticated(_))),
                "{refused:?}"
            );
        }
        // No keys: authentication is off.
        assert_eq!(ApiKeys::default().authorize(None, Scope::Admin), Ok(()));
    }

    #[test]
    fn bad_entries_are_refused_by_number_without_echoing_the_token() {
        for (text, expected) in [
            ("tiny read", "shorter than"),
            ("abcdefghijklmnopq", "expected `TOKEN"),
            ("abcdefghijklmnopq root", "unknown scope `root`"),
            ("abcdefghijklmnopq read;abcdefghijklmnopq write", "twice"),
        ] {
            let error = ApiKeys::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(
                !error.contains("abcdefghijklmnopq") && !error.contains("tiny"),
                "{error}"
            );
        }
        assert_eq!(format!("{:?}", keys()), "ApiKeys(3 keys)");
        assert!(keys().merged(keys()).is_err());
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
