//! The errors of reading and writing datasets, each naming the file (and record) at fault.

use std::path::PathBuf;

/// What went wrong reading or writing a dataset, and where.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file system refused an operation.
    #[error("{path}: {source}")]
    Io {
        /// File or folder concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file's contents break its format.
    #[error("{path}{}: {message}", offset.map(|o| format!(" (byte {o})")).unwrap_or_default())]
    Malformed {
        /// File concerned.
        path: PathBuf,
        /// Byte offset of the problem in the (decompressed) contents, where known.
        offset: Option<u64>,
        /// What is wrong.
        message: String,
    },
    /// An image file could not be decoded or encoded.
    #[error("{path}: cannot {action} image: {source}")]
    Image {
        /// File concerned.
        path: PathBuf,
        /// "decode" or "encode".
        action: &'static str,
        /// Underlying error.
        source: image::ImageError,
    },
    /// The input does not hold what was asked for.
    #[error("{path}: {message}")]
    Input {
        /// File or folder concerned.
        path: PathBuf,
        /// What is missing or ambiguous.
        message: String,
    },
    /// An in-memory dataset would break its invariants.
    #[error("invalid dataset: {0}")]
    Invalid(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) -> Self {
        Self::Malformed {
            path: path.into(),
            offset,
            message: message.into(),
        }
    }

    pub(crate) fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Input {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A format violation found by a byte-level parser, before a path is attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    /// Byte offset of the problem, where known.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(offset: Option<u64>, message: impl Into<String>) -> Self {
        Self {
            offset,
            message: message.into(),
        }
    }

    /// Attaches the file the bytes came from.
    pub fn at(self, path: impl Into<PathBuf>) -> DatasetError {
        DatasetError::malformed(path, self.offset, self.message)
    }
}
