//! The error of a value that is not acceptable, read from text or found in data, where a richer
//! type would add nothing: a name that is not one of the accepted ones, a key of the wrong
//! length, a field of a model server's answer that does not say what it must. The message says
//! what is wrong and where; callers add the context (the flag, the URL, the file).

/// A value that is not acceptable; the message says what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

/// The message.
impl std::ops::Deref for Invalid {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}
