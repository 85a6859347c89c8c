use clap::{Parser, Subcommand};
use xsrec::cli;

/// See Cargo.toml: with the unprefixed feature this is also the C/C++ `malloc` libtorch uses.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (it reads this symbol before `main`). Allocations past
/// `oversize_threshold` (8 MiB by default) otherwise go to an arena that returns every freed
/// page to the kernel at once, whatever the decay settings: a training process, which frees and
/// reallocates hundreds of MB of logits per batch, then spends a third of its time in page
/// faults (see `xsrec::train::pages`). Without it they share the ordinary arenas and their decay.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[export_name = "malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; 21] = b"oversize_threshold:0\0";

/// Cross-session next-item recommendation on libtorch.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Obtain or generate event logs.
    #[command(subcommand)]
    Data(cli::data::DataCommand),
    /// Train a model and write its artifact directory.
    Train(cli::train::TrainArgs),
    /// Full-ranking evaluation of a saved model.
    Eval(cli::eval::EvalArgs),
    /// Score one synthetic cross-session log: references, oracle and trained models, by session start.
    CrossSession(cli::cross_session::CrossSessionArgs),
    /// Draw what the model attends to for one user, with its top-10.
    Explain(cli::explain::ExplainArgs),
    /// Raw scores for given histories (for checking other implementations).
    Score(cli::score::ScoreArgs),
    /// Measure the inference path: ceilings, batch timings, device parity, HTTP load.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// The durable history store offline: import a log, export for training, compact.
    #[command(subcommand)]
    History(cli::history::HistoryCommand),
    /// Serve recommendations over HTTP.
    Serve(Box<xsrec::serve::ServeConfig>),
    /// Print the REST API's OpenAPI document (what `/openapi.json` serves; `docs/openapi.json`).
    Openapi,
}

impl Command {
    /// The server, and the load generator (its connections can be closed by the server).
    fn writes_to_sockets(&self) -> bool {
        matches!(
            self,
            Command::Serve(_) | Command::Bench(cli::bench::BenchCommand::Load(_))
        )
    }
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // Rust ignores SIGPIPE, which turns `xsrec … | head` into a panic on the next println!;
    // the default action ends the process quietly, as for any Unix filter. Not for the
    // commands that write to sockets: there the default action let any client that closed its
    // connection mid-response kill the whole server (hyper's writev has no MSG_NOSIGNAL), and
    // ignored, the write fails with EPIPE and only that connection ends.
    if !command.writes_to_sockets() {
        // SAFETY: called before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Fault injection for tests (FAILPOINTS=name=action); compiled out of normal builds.
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    match command {
        Command::Data(command) => cli::data::run(&command),
        Command::Train(args) => {
            xsrec::train::pages::keep_freed_pages();
            cli::train::run(&args)
        }
        Command::Eval(args) => cli::eval::run(&args),
        Command::CrossSession(args) => {
            xsrec::train::pages::keep_freed_pages();
            cli::cross_session::run(&args)
        }
        Command::Explain(args) => cli::explain::run(&args),
        Command::Score(args) => cli::score::run(&args),
        Command::Bench(command) => cli::bench::run(&command),
        Command::History(command) => cli::history::run(&command),
        Command::Serve(config) => cli::serve::run(&config),
        Command::Openapi => {
            print!("{}", xsrec::api::openapi::document());
            Ok(())
        }
    }
}
