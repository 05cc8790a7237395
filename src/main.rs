//! `im-ingest` binary: parses the command line, runs it, and turns an error into one
//! line on stderr and a non-zero exit code.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = im_ingest::cli::Cli::parse();
    match im_ingest::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The context chain on one line: "creating database: access denied".
            eprintln!("im-ingest: {}", im_ingest::telemetry::error_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}
