//! The `hallmark` binary: parses the command line and hands it to the library's `cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hallmark::cli::Cli::parse();
    match hallmark::cli::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
