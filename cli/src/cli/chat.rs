//! `stackwise chat`: an interactive prompt loop over any model. Each line is a prompt and
//! gets a response on stdout; `train` runs a training cycle on `--config`'s data and
//! continues with the new checkpoint; `quit` or `exit` (or end of input) leaves. On a
//! terminal it shows a `> ` prompt on stderr; from a pipe it reads lines and writes only the
//! responses, one per line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use stackwise_common::checkpoint::CheckpointStore;
use stackwise_common::config::load_config;
use stackwise_common::plan::plan_config;
use stackwise_common::store::Store;
use stackwise_worker::train::{RunOptions, Trainer};

use super::args::ModelArgs;
use super::generate::{SamplingArgs, autoregressive, encode_prompt};
use super::model_source::LoadedModel;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// The training config `train` runs a cycle of (`training.steps` more steps on its
    /// data, resuming its run when it has checkpoints); the chat then uses the run's newest
    /// checkpoint.
    #[arg(long, value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let mut m = a.source.load_for_decoding()?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} (type a prompt; `train` runs a training cycle{}; `quit` or `exit` leaves)",
            m.source,
            if a.config.is_some() {
                ""
            } else {
                ", with --config"
            }
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else {
            break;
        };
        let line = line.context("read stdin")?;
        let line = line.trim();
        match line {
            "" => continue,
            "quit" | "exit" => break,
            "train" => match &a.config {
                None => eprintln!("train needs --config CONFIG (the run to train)"),
                Some(config) => {
                    let run_dir = train_cycle(config)?;
                    m = ModelArgs {
                        model: run_dir,
                        ..a.source.clone()
                    }
                    .load_for_decoding()?;
                    eprintln!("now chatting with {}", m.source);
                }
            },
            prompt => match respond(&m, prompt, &a.sampling) {
                Ok(text) => {
                    writeln!(out, "{text}")?;
                    out.flush()?;
                }
                // A bad prompt (too long, empty after tokenizing) ends nothing.
                Err(e) => eprintln!("error: {e:#}"),
            },
        }
    }
    Ok(())
}

/// The model's response to `prompt`, on one line.
fn respond(m: &LoadedModel, prompt: &str, s: &SamplingArgs) -> Result<String> {
    let ids = encode_prompt(m, prompt)?;
    let cfg = s.config(m)?;
    let g = autoregressive(m, &ids, &cfg, s.scaffold_weight)?;
    Ok(m.tok
        .decode(&g.tokens)?
        .replace('\n', " ")
        .trim()
        .to_string())
}

/// Train `config` for `training.steps` more steps (resuming its run when it has a
/// checkpoint), with progress on stderr; returns the run folder.
fn train_cycle(config: &Path) -> Result<PathBuf> {
    let mut cfg = load_config(config, &[])?;
    let run = Store::open(&cfg.run.output)?.child(&format!("runs/{}", cfg.run.name));
    let Some(dir) = run.local_path() else {
        bail!(
            "chat trains runs on local files; {} is not (train it with `stackwise train`)",
            run.uri()
        )
    };
    let latest = CheckpointStore::new(&run).load_latest()?;
    let done = match &latest {
        Some(c) => {
            let state: serde_json::Value = serde_json::from_slice(
                c.files
                    .get(stackwise_worker::checkpoint::TRAINER_STATE)
                    .context("the checkpoint has no trainer state")?,
            )?;
            state["step"].as_u64().unwrap_or(0)
        }
        None => 0,
    };
    let cycle = cfg.training.steps;
    cfg.training.steps = done + cycle;
    eprintln!(
        "training cycle: steps {}..{} of {}",
        done,
        done + cycle,
        config.display()
    );
    let opts = RunOptions {
        resume: latest.is_some(),
        until_step: None,
        progress: std::io::stderr().is_terminal(),
        resume_from: None,
        plan: Some(plan_config(&cfg)?),
    };
    let summary = Trainer::new(cfg, &opts)?.run(&opts)?;
    eprintln!(
        "trained to step {} | val loss {} | checkpoint {}",
        summary.step,
        summary.val_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_checkpoint.as_deref().unwrap_or("-")
    );
    Ok(dir)
}
