//! `cocoon-vmm-fuzz`: a small coverage-guided fuzzer for cocoon-vmm that runs on stable
//! Rust. Each target starts from its committed corpus (`corpus/<target>/`), mutates
//! inputs with a seeded RNG for a fixed time, keeps those that reach new coverage, and
//! stops at the first panic, saving the input that caused it.
//!
//! Usage: `cocoon-vmm-fuzz [--seconds N] [--seed S] [--corpus DIR] [--crashes DIR]
//! [TARGET...]` (all targets by default), or `cocoon-vmm-fuzz --replay FILE TARGET`.

mod coverage;
mod input;
mod targets;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use coverage::Coverage;
use targets::{Target, TARGETS};

/// xorshift64*: small, fast, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u8; 10] = [0, 1, 2, 7, 16, 44, 0x7f, 0x80, 0xfe, 0xff];

/// Applies one to eight random edits to `input`, splicing from `other` at times.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], max_len: usize) {
    for _ in 0..=rng.below(8) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if len > 1 => {
                // A little-endian u16/u32 nudged up or down.
                let i = rng.below(len - 1);
                let delta = (rng.below(33) as i32 - 16) as u8;
                input[i] = input[i].wrapping_add(delta);
            }
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                input.drain(at..at + n);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(32));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            7 if !other.is_empty() => {
                let at = rng.below(other.len());
                let n = 1 + rng.below((other.len() - at).min(64));
                let to = rng.below(len + 1);
                input.splice(to..to, other[at..at + n].iter().copied());
            }
            _ => {
                let to = rng.below(len + 1);
                input.insert(to, rng.next() as u8);
            }
        }
    }
    input.truncate(max_len);
}

/// Runs one input; `Err` with the panic message if it panicked.
fn execute(target: &Target, input: &[u8]) -> Result<(), String> {
    std::panic::catch_unwind(|| (target.run)(input)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// FNV-1a, to name saved inputs by content.
fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

struct Outcome {
    execs: u64,
    corpus: usize,
    edges: usize,
    crash: Option<(PathBuf, String)>,
}

fn fuzz(target: &Target, seconds: u64, seed: u64, corpus_dir: &Path, crashes: &Path) -> Outcome {
    let mut cov = Coverage::new();
    let mut rng = Rng(seed ^ hash(target.name.as_bytes()) | 1);
    let mut corpus = load_corpus(&corpus_dir.join(target.name));
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let save_crash = |input: &[u8], msg: String| {
        let _ = std::fs::create_dir_all(crashes);
        let path = crashes.join(format!("{}-{:016x}", target.name, hash(input)));
        let _ = std::fs::write(&path, input);
        Some((path, msg))
    };
    let mut execs = 0u64;
    // The seeds first: each must pass, and they set the coverage baseline.
    for input in corpus.clone() {
        cov.reset();
        execs += 1;
        if let Err(msg) = execute(target, &input) {
            let crash = save_crash(&input, msg);
            return Outcome {
                execs,
                corpus: corpus.len(),
                edges: cov.edges(),
                crash,
            };
        }
        cov.update();
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut input = Vec::with_capacity(target.max_len);
    while Instant::now() < deadline {
        for _ in 0..64 {
            let base = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            input.clear();
            input.extend_from_slice(base);
            mutate(&mut rng, &mut input, other, target.max_len);
            cov.reset();
            execs += 1;
            if let Err(msg) = execute(target, &input) {
                let crash = save_crash(&input, msg);
                return Outcome {
                    execs,
                    corpus: corpus.len(),
                    edges: cov.edges(),
                    crash,
                };
            }
            if cov.update() > 0 {
                corpus.push(input.clone());
            }
        }
    }
    Outcome {
        execs,
        corpus: corpus.len(),
        edges: cov.edges(),
        crash: None,
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: cocoon-vmm-fuzz [--seconds N] [--seed S] [--corpus DIR] [--crashes DIR] [TARGET...]\n       cocoon-vmm-fuzz --replay FILE TARGET\ntargets: {}",
        TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(" ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seconds = 60;
    let mut seed = 1;
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut corpus = here.join("corpus");
    let mut crashes = here.join("crashes");
    let mut replay = None;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next();
        match arg.as_str() {
            "--seconds" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => seconds = v,
                None => return usage(),
            },
            "--seed" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => seed = v,
                None => return usage(),
            },
            "--corpus" => match value() {
                Some(v) => corpus = v.into(),
                None => return usage(),
            },
            "--crashes" => match value() {
                Some(v) => crashes = v.into(),
                None => return usage(),
            },
            "--replay" => match value() {
                Some(v) => replay = Some(PathBuf::from(v)),
                None => return usage(),
            },
            name => names.push(name.to_string()),
        }
    }
    let mut selected = Vec::new();
    for name in &names {
        match TARGETS.iter().find(|t| t.name == name) {
            Some(t) => selected.push(t),
            None => return usage(),
        }
    }
    if let Some(file) = replay {
        let ([target], Ok(input)) = (selected.as_slice(), std::fs::read(&file)) else {
            return usage();
        };
        return match execute(target, &input) {
            Ok(()) => {
                println!("{}: {} passes", target.name, file.display());
                ExitCode::SUCCESS
            }
            Err(msg) => {
                println!("{}: {} panics: {msg}", target.name, file.display());
                ExitCode::FAILURE
            }
        };
    }
    if selected.is_empty() {
        selected = TARGETS.iter().collect();
    }
    // Panics are reported with the saved input; the default hook's message goes first.
    if !Coverage::new().instrumented() {
        println!("note: built without coverage instrumentation: random mutation only");
    }
    let mut failed = false;
    for target in selected {
        let out = fuzz(target, seconds, seed, &corpus, &crashes);
        println!(
            "{:<22} {:>10} execs in {seconds} s, corpus {:>5}, edges {:>6}",
            target.name, out.execs, out.corpus, out.edges
        );
        if let Some((path, msg)) = out.crash {
            println!(
                "CRASH {}: {msg}\n  input saved to {}\n  replay: cocoon-vmm-fuzz --replay {} {}",
                target.name,
                path.display(),
                path.display(),
                target.name
            );
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
