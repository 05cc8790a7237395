//! Values that must never reach a log line or `Debug` output.
//!
//! Guarantee: `Debug` of [`Secret`] prints a fixed placeholder, and `Debug`/`Display` of
//! [`SecretUrl`] print the URL with its password replaced, so settings can be logged
//! whole. The real value is reachable only through an explicit `expose()`, and its
//! memory is zeroed when dropped (`secrecy`).

use std::fmt;
use std::path::Path;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A secret string, such as a SASL password: a [`SecretString`] (zeroed when dropped),
/// with a `Debug` that prints a fixed placeholder.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub const REDACTED: &'static str = "[redacted]";

    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// Reads a secret from a file (Docker and Kubernetes secrets, systemd credentials):
    /// its whole content, less one trailing line break. An empty file is an error, since
    /// it is more likely a mistake than an empty password.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let mut text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the secret file {}", path.display()))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        anyhow::ensure!(
            !text.is_empty(),
            "the secret file {} is empty",
            path.display()
        );
        Ok(Self::new(text))
    }

    /// The real value: pass it only to the client that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

/// A connection URL that may carry a password (`mysql://user:pass@host/db`).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(Secret);

impl SecretUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Secret::new(value))
    }

    /// The real URL, password included: pass it only to the client that needs it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn parsed(&self) -> Result<url::Url, url::ParseError> {
        url::Url::parse(self.expose())
    }

    /// Whether the URL carries a password.
    pub fn has_password(&self) -> bool {
        self.parsed().is_ok_and(|url| url.password().is_some())
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
    fn a_secret_file_loses_one_trailing_line_break_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        assert_eq!(Secret::from_file(&file).unwrap().expose(), "s3cret");
        std::fs::write(&file, " two words \n\n").unwrap();
        assert_eq!(Secret::from_file(&file).unwrap().expose(), " two words \n");
        std::fs::write(&file, "\n").unwrap();
        let error = Secret::from_file(&file).unwrap_err().to_string();
        assert!(error.contains("is empty"), "{error}");
        let error = format!(
            "{:#}",
            Secret::from_file(&dir.path().join("none")).unwrap_err()
        );
        assert!(error.contains("reading the secret file"), "{error}");
    }

    #[test]
    fn unparseable_url_is_not_shown() {
        let url = SecretUrl::new("not a url with secret");
        assert!(!format!("{url:?}").contains("secret"));
    }
}
