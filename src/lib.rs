//! hallmark: secret, poison-only backdoor watermarks for image datasets, and black-box
//! verification of whether a suspicious model was trained on a watermarked release.
//!
//! # Layout
//!
//! Read in this order; each module's own comment says what it holds.
//! - [`dataset`]: images and labels in memory, and the formats they are read from and written to.
//! - [`spec`]: a watermark spec (a trigger family, labelling, rate) parsed and checked.
//! - [`watermark`]: stamping a dataset with a spec, the secret record and its commitment.
//! - [`endpoint`]: a model behind HTTP (or in-process) answering batches of images, and the
//!   checked settings a user gives for it.
//! - [`stats`] and [`verify`]: the tests, and the verification that runs them against a model.
//! - [`store`], [`jobs`], [`http`], [`config`]: the service (database, durable jobs, API).
//! - `train` (feature `train`): the trainer that reproduces the attacks (a training loop with
//!   hooks, one file per attack), a thief's defences (training-time hooks, model repairs, gates
//!   in front of a served model), crafting, and calibration (`train::calibrate::run`).
//! - [`cli`]: the command line, one file per command; it parses, calls the modules above and
//!   prints.
//!
//! [`ErrorCode`] holds every code a client of the service reads; [`Invalid`] is the error of a
//! value that is not acceptable, where a richer type would add nothing.
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod dataset;
pub mod endpoint;
mod error_code;
pub mod fsutil;
pub mod http;
mod invalid;
pub mod jobs;
pub mod report;
pub mod spec;
pub mod stats;
pub mod store;
#[cfg(feature = "train")]
pub mod train;
pub mod verify;
pub mod watermark;

pub use error_code::ErrorCode;
pub use invalid::Invalid;
