//! hallmark: secret, poison-only backdoor watermarks for image datasets, and black-box
//! verification of whether a suspicious model was trained on a watermarked release.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod dataset;
pub mod endpoint;
mod error_code;
pub mod fsutil;
pub mod http;
pub mod jobs;
pub mod spec;
pub mod stats;
pub mod store;
#[cfg(feature = "train")]
pub mod train;
pub mod verify;
pub mod watermark;

pub use error_code::ErrorCode;
