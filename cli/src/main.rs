//! `stackwise`: the one binary of StackWise. Parses the command line and dispatches.

use clap::{Parser, Subcommand};

mod cli;
mod launch;
mod plot;
mod serve;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "stackwise", version, about = "Train, evaluate and sample transformer language models", long_about = None)]
struct Cli {
    /// CPU threads for tensor kernels (default: physical cores; also RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a YAML config (single process).
    Train(cli::train::TrainArgs),
    /// Fine-tune a pretrained model: fully (baseline), with LoRA, or with QLoRA on an NF4 base.
    Finetune(cli::finetune::FinetuneArgs),
    /// Print the stage plan of a config: what trains, what is frozen and at which precision,
    /// adapters, objective, attention, mask fractions, steps.
    Plan(cli::train::PlanArgs),
    /// Single-node job: a coordinator plus N local workers (the debug mode).
    Launch(cli::dist::LaunchArgs),
    /// Serve a job to workers on other processes or machines.
    Coordinator(cli::dist::CoordinatorArgs),
    /// Join a coordinator and train what it says.
    Worker(cli::dist::WorkerArgs),
    /// Workers, ranks, stage, step, loss and tokens/s of a running job.
    Status(cli::dist::StatusArgs),
    /// List, inspect and verify checkpoints in any store (path, file://, s3://).
    #[command(subcommand)]
    Ckpt(cli::ckpt::CkptCommand),
    /// Merge and inspect PEFT adapter folders (LoRA, BOFT).
    #[command(subcommand)]
    Adapter(cli::adapter::AdapterCommand),
    /// Prepare datasets.
    #[command(subcommand)]
    Data(cli::data::DataCommand),
    /// Train tokenizers.
    #[command(subcommand)]
    Tokenizer(cli::data::TokenizerCommand),
    /// Mean next-token loss and perplexity of a model on a text file.
    Eval(cli::eval::EvalArgs),
    /// Generate text from a model.
    Generate(cli::generate::GenerateArgs),
    /// Plot a run's loss, validation loss and tokens/s from its metrics (SVG or PNG).
    Plot(plot::PlotArgs),
    /// An interactive prompt loop over a model (`train` runs a training cycle; `quit` leaves).
    Chat(cli::chat::ChatArgs),
    /// Serve a model over HTTP: the original /generate and OpenAI's completions API.
    Serve(cli::serve::ServeArgs),
    /// Train a small model on an embedded corpus and sample from it: the first thing to run.
    Quickstart(cli::quickstart::QuickstartArgs),
    /// Measure training and generation tokens/s on a device (one JSON line each).
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// Check this build on a device against PyTorch reference fixtures (logits, gradients,
    /// AdamW steps) and, on CUDA, NCCL; prints a JSON report, exits 1 on a mismatch.
    Selfcheck(cli::selfcheck::SelfcheckArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    stackwise_worker::alloc::tune_for_training();
    cli::logging::init_logging();
    if let Some(n) = cli.threads {
        // SAFETY: no other thread exists yet; candle and rayon read this once, at first use.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let result = match cli.command {
        Command::Train(a) => cli::train::run(a),
        Command::Finetune(a) => cli::finetune::run(a),
        Command::Plan(a) => cli::train::run_plan(a),
        Command::Launch(a) => cli::dist::run_launch(a),
        Command::Coordinator(a) => cli::dist::run_coordinator(a),
        Command::Worker(a) => cli::dist::run_worker_cmd(a),
        Command::Status(a) => cli::dist::run_status(a),
        Command::Ckpt(c) => cli::ckpt::run(c),
        Command::Adapter(c) => cli::adapter::run(c),
        Command::Data(c) => cli::data::run_data(c),
        Command::Tokenizer(c) => cli::data::run_tokenizer(c),
        Command::Eval(a) => cli::eval::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Chat(a) => cli::chat::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Quickstart(a) => cli::quickstart::run(a),
        Command::Bench(c) => cli::bench::run(c),
        Command::Selfcheck(a) => cli::selfcheck::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<stackwise_worker::runtime::JobStopped>() => {
            eprintln!("{e:#}");
            std::process::ExitCode::from(stackwise_worker::runtime::JobStopped::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
