//! The `hallmark` binary: parses the command line and hands it to the library's `cli`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hallmark::cli::Cli::parse();
    // Output piped into a reader that stops early (`hallmark spec check … | head`) ends the
    // process quietly, as other command-line tools do, instead of a panic on the next print.
    // Servers keep Rust's default (the signal ignored, the write failing).
    if !cli.command.is_server() {
        // SAFETY: restores a signal's default disposition at start-up, before any thread.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match hallmark::cli::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
