//! Integration tests: one binary, each test with its own temporary folder.

#[cfg(feature = "train")]
mod attacks;
mod cli;
mod console;
mod endpoint;
mod examples;
mod fashion_mnist;
mod formats;
mod mlserver;
mod parquet;
mod security;
mod service;
mod service_process;
mod stream;
#[cfg(feature = "train")]
mod train;
mod webdataset;
