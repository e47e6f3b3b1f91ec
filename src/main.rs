//! The `imglish` command-line tool: a thin layer over the stage crates. `main` parses the arguments, sets up
//! logging and the thread pool, runs the subcommand and maps errors to exit codes (0 ok, 1 failure, 2 usage).

mod cli;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(msg) = cli.validate() {
        use clap::CommandFactory;
        cli::Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, msg)
            .exit();
    }
    let out = output::Output::new(&cli.global);
    out.init_logging();
    match commands::run(cli, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            out.error(&err);
            ExitCode::from(1)
        }
    }
}
