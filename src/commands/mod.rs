//! One module per subcommand; each turns parsed arguments into calls of a stage crate.

pub mod build;
pub mod demo;
mod doctor;
pub mod download;
mod dvae;
pub mod embed;
pub mod finetune;
mod folders;
pub mod ingest;
pub mod inspect;
mod lock;
pub mod pack;
pub mod probe;
pub mod quickstart;
mod sheet;
pub mod tokenize;
pub mod tokenizer;
pub mod train;
pub mod verify;

use anyhow::Context;

use crate::cli::{Cli, Command};
use crate::output::Output;

/// Runs the parsed command line.
pub fn run(cli: Cli, out: &Output) -> anyhow::Result<()> {
    let threads = cli
        .global
        .threads
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("cannot start the worker thread pool")?;
    imglish_pack::set_remote_options(cli.global.remote_options());
    dispatch(cli.command, threads, out)
}

/// Runs one command with the pool already set up (`quickstart` runs the stages through here).
pub fn dispatch(command: Command, threads: usize, out: &Output) -> anyhow::Result<()> {
    match command {
        Command::DemoCorpus(args) => demo::run(&args, out),
        Command::Doctor => doctor::run(threads, out),
        Command::Download(args) => download::run(&args, threads, out),
        Command::Ingest(args) => ingest::run(&args, out),
        Command::Tokenizer(args) => tokenizer::run(&args, threads, out),
        Command::Tokenize(args) => tokenize::run(&args, threads, out),
        Command::Pack(args) => pack::run(&args, &imglish_pack::RemoteOptions::current(), out),
        Command::Verify(args) => verify::run(&args, out),
        Command::Inspect(args) => inspect::run(&args, out),
        Command::Train(args) => train::run(&args, threads, out),
        Command::Probe(args) => probe::run(&args, threads, out),
        Command::Embed(args) => embed::run(&args, threads, out),
        Command::Finetune(args) => finetune::run(&args, threads, out),
        Command::Quickstart(args) => quickstart::run(&args, threads, out),
        Command::Build(args) => build::run(&args, threads, out),
    }
}
