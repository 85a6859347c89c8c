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
/// faults (see [`keep_freed_pages`]). Without it they share the ordinary arenas and their decay.
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

fn main() -> anyhow::Result<()> {
    // Rust ignores SIGPIPE, which turns `xsrec … | head` into a panic on the next println!;
    // the default action ends the process quietly, as for any Unix filter.
    // SAFETY: called before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Fault injection for tests (FAILPOINTS=name=action); compiled out of normal builds.
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    match Cli::parse().command {
        Command::Data(command) => cli::data::run(&command),
        Command::Train(args) => {
            keep_freed_pages();
            cli::train::run(&args)
        }
        Command::Eval(args) => cli::eval::run(&args),
        Command::CrossSession(args) => {
            keep_freed_pages();
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

/// Training frees and reallocates the same few hundred MB of tensors every batch (logits over the
/// catalogue and their gradients). jemalloc's defaults hand freed pages back to the kernel within
/// seconds, and at once for allocations past 8 MiB, so each batch faulted them in again and the
/// kernel zeroed them: 6.7 M page faults in 30 s, and an ML-1M epoch spent 80 s of its 185 s in
/// the kernel (1.9 s of 162 s with this; docs/BENCHMARKS.md). A process that trains keeps its freed pages; serving keeps the defaults,
/// which give memory back after users are erased.
fn keep_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::CString;
        use std::ptr::null_mut;
        let never_decay = |name: &std::ffi::CStr| {
            let mut never: libc::ssize_t = -1;
            // SAFETY: every `*dirty_decay_ms` control takes an ssize_t, written from `never`,
            // which outlives the call; nothing is read back (null old pointers).
            unsafe {
                tikv_jemalloc_sys::mallctl(
                    name.as_ptr(),
                    null_mut(),
                    null_mut(),
                    (&raw mut never).cast(),
                    std::mem::size_of::<libc::ssize_t>(),
                )
            }
        };
        // The default of arenas made later (threads libtorch starts get theirs on first use).
        if never_decay(c"arenas.dirty_decay_ms") != 0 {
            eprintln!("warning: jemalloc refused arenas.dirty_decay_ms; training runs, but slower");
        }
        let mut narenas: libc::c_uint = 0;
        let mut size = std::mem::size_of::<libc::c_uint>();
        // SAFETY: `arenas.narenas` is an unsigned int read into `narenas`, `size` its length.
        let read = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arenas.narenas".as_ptr(),
                (&raw mut narenas).cast(),
                &raw mut size,
                null_mut(),
                0,
            )
        };
        let existing = if read == 0 { narenas } else { 0 };
        // Arenas not made yet refuse (EFAULT) and will take the default set above.
        for arena in 0..existing {
            let name = CString::new(format!("arena.{arena}.dirty_decay_ms")).expect("no NUL");
            never_decay(&name);
        }
    }
}
