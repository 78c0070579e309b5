//! One error type for everything in core. Every failure is a value with a message; nothing panics on input.
use alloc::string::String;
use core::fmt;

/// What went wrong, coarsely; the message says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A file or buffer is not in the expected format (truncated, malformed header, wrong dtype).
    Format,
    /// Shapes do not fit (input vs model, operator vs signal, tensor in a checkpoint).
    Shape,
    /// A tensor a checkpoint must hold is not there.
    MissingTensor,
    /// An option is out of range (steps 0, negative std, ...).
    InvalidArgument,
    /// NaN or Inf where finite numbers are required.
    NonFinite,
    /// The caller asked to stop (progress callback).
    Cancelled,
    /// A feature this build or machine does not have (a backend not compiled in, no GPU adapter).
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, message)
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn non_finite(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NonFinite, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

pub type Result<T> = core::result::Result<T, Error>;
