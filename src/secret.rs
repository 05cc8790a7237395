//! Values that must never reach a log line or `Debug` output.
//!
//! Guarantee: `Debug` and `Display` of [`Secret`] print a fixed placeholder, and those of
//! [`SecretUrl`] print the URL with its password replaced, so settings can be logged
//! whole. The real value is reachable only through an explicit `expose()`.

use std::fmt;

use serde::Deserialize;

/// A secret string, such as a SASL password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub const REDACTED: &'static str = "[redacted]";

    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real value: pass it only to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

/// A connection URL that may carry a password (`mysql://user:pass@host/db`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The real URL, password included: pass it only to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn parsed(&self) -> Result<url::Url, url::ParseError> {
        url::Url::parse(&self.0)
    }

    /// The URL with its password replaced by `***`, safe to log.
    pub fn redacted(&self) -> String {
        match self.parsed() {
            Ok(mut url) => {
                if url.password().is_some() {
                    // Cannot fail: a URL with a password has a host.
                    // Stars: a placeholder a URL keeps as it is (brackets would be
                    // percent-escaped into `%5Bredacted%5D`).
                    let _ = url.set_password(Some(REDACTED_PASSWORD));
                }
                url.to_string()
            }
            // Unparseable: it may still hold a password somewhere, so show nothing of it.
            Err(_) => "[unparseable url]".to_string(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// What a URL's password is shown as.
const REDACTED_PASSWORD: &str = "***";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_hides_the_value() {
        assert_eq!(format!("{:?}", Secret::new("pw")), "[redacted]");
    }

    #[test]
    fn url_password_is_replaced_but_user_and_host_stay() {
        let url = SecretUrl::new("mysql://app:p%40ss@db.internal:3306/im");
        let shown = format!("{url} {url:?}");
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );
        assert!(
            shown.contains("app:") && shown.contains("db.internal:3306/im"),
            "{shown}"
        );
        assert_eq!(url.expose(), "mysql://app:p%40ss@db.internal:3306/im");
        assert_eq!(url.to_string(), "mysql://app:***@db.internal:3306/im");
    }

    #[test]
    fn unparseable_url_is_not_shown() {
        let url = SecretUrl::new("not a url with secret");
        assert!(!format!("{url:?}").contains("secret"));
    }
}
