//! The `cocoon` operator CLI: the work behind each subcommand, kept out of the binary so
//! that the pure parts (procfs parsing, table layout, id-prefix matching) are unit-tested.
//!
//! Everything here reads what the runtime writes under the configuration's `state_dir`
//! (`/run/cocoon/<sandbox id>/`: `pod.json`, `vmm.pid`, `console.log`, ...) through the
//! public API of [`crate::state`], [`crate::vmm`] and [`crate::image`]; nothing here is
//! used by the shim.

pub mod check;
pub mod console;
pub mod gc;
pub mod image;
pub mod procfs;
pub mod ps;
pub mod table;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{Config, VmSize, MIN_MEMORY_MIB};
use crate::vmm::{VmmProcess, VmmSpec};

/// What a CLI command can fail with. Every variant names the thing it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] crate::error::Error),
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No sandbox directory matches the id or prefix given.
    #[error("no sandbox matches {query:?} in {state_dir} (see `cocoon ps`)")]
    NoSandbox { query: String, state_dir: PathBuf },
    /// More than one sandbox directory starts with the prefix given.
    #[error("sandbox prefix {query:?} is ambiguous: {} (give more characters)", candidates.join(", "))]
    AmbiguousSandbox {
        query: String,
        candidates: Vec<String>,
    },
    /// `cocoon check` found required items failing.
    #[error("host is not ready for Cocoon sandboxes: {0} required check(s) failed")]
    NotReady(usize),
    #[error("{0}")]
    Usage(String),
}

/// The CLI's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`]; meant for `map_err(Error::io("reading", &path))`.
    pub fn io(action: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// The directory of `state_dir` that are not sandboxes.
const NOT_SANDBOXES: &[&str] = &["image-refs"];

/// Whether `name` can be a sandbox id (the rule [`VmmSpec::for_sandbox`] enforces).
pub fn is_sandbox_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !NOT_SANDBOXES.contains(&name)
}

/// The sandbox ids in the configuration's `state_dir`, sorted. A missing `state_dir`
/// means no sandboxes.
pub fn sandbox_ids(config: &Config) -> Result<Vec<String>> {
    let entries = match fs::read_dir(&config.state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing state directory", &config.state_dir)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("listing state directory", &config.state_dir))?;
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
            if is_sandbox_name(name) {
                ids.push(name.to_string());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// The one id of `ids` that `query` names: an exact match, else the only id it prefixes.
pub fn match_id<'a>(ids: &'a [String], query: &str) -> std::result::Result<&'a str, Vec<String>> {
    if let Some(exact) = ids.iter().find(|id| *id == query) {
        return Ok(exact);
    }
    let found: Vec<&String> = if query.is_empty() {
        Vec::new()
    } else {
        ids.iter().filter(|id| id.starts_with(query)).collect()
    };
    match found.as_slice() {
        [one] => Ok(one),
        many => Err(many.iter().map(|s| s.to_string()).collect()),
    }
}

/// Resolves a sandbox id or prefix against the sandboxes on this host.
pub fn resolve_sandbox(config: &Config, query: &str) -> Result<String> {
    let ids = sandbox_ids(config)?;
    match match_id(&ids, query) {
        Ok(id) => Ok(id.to_string()),
        Err(candidates) if candidates.is_empty() => Err(Error::NoSandbox {
            query: query.into(),
            state_dir: config.state_dir.clone(),
        }),
        Err(candidates) => Err(Error::AmbiguousSandbox {
            query: query.into(),
            candidates: candidates.iter().map(|c| short_id(c).to_string()).collect(),
        }),
    }
}

/// The first 12 characters of an id, as `docker`/`crictl` show them.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// What the pid file of a sandbox says about its VMM.
#[derive(Debug)]
pub enum VmmState {
    /// The VMM runs (verified: start time and control socket match).
    Running(VmmProcess),
    /// A `vmm.pid` exists but its process is gone (or is another process now).
    Dead,
    /// No `vmm.pid`: the VM was never started, or was shut down cleanly.
    NoPidFile,
}

/// The state of `sandbox_id`'s VMM, through [`VmmProcess::from_pid_file`].
pub fn vmm_state(config: &Config, sandbox_id: &str) -> Result<VmmState> {
    // The size does not matter for the file layout.
    let size = VmSize {
        vcpus: 1,
        memory_mib: MIN_MEMORY_MIB,
    };
    let spec = VmmSpec::for_sandbox(config, sandbox_id, size)?;
    if !spec.pid_file.exists() {
        return Ok(VmmState::NoPidFile);
    }
    Ok(
        match VmmProcess::from_pid_file(sandbox_id, &spec.pid_file, &spec.control_socket)? {
            Some(vmm) => VmmState::Running(vmm),
            None => VmmState::Dead,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_match_wins_over_prefix() {
        let ids = ids(&["abc", "abcdef", "bcd"]);
        assert_eq!(match_id(&ids, "abc"), Ok("abc"));
        assert_eq!(match_id(&ids, "abcd"), Ok("abcdef"));
        assert_eq!(match_id(&ids, "b"), Ok("bcd"));
    }

    #[test]
    fn ambiguous_and_missing_prefixes_are_errors() {
        let ids = ids(&["abc1", "abc2", "xyz"]);
        assert_eq!(
            match_id(&ids, "abc"),
            Err(vec!["abc1".into(), "abc2".into()])
        );
        assert_eq!(match_id(&ids, "q"), Err(vec![]));
        assert_eq!(match_id(&ids, ""), Err(vec![]));
    }

    #[test]
    fn resolve_names_state_dir_and_candidates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().to_path_buf(),
            ..Config::default()
        };
        for d in ["aaaa1111", "aaaa2222", "image-refs", ".hidden"] {
            fs::create_dir(tmp.path().join(d)).expect("mkdir");
        }
        fs::write(tmp.path().join("file"), "").expect("file");
        assert_eq!(
            sandbox_ids(&config).expect("ids"),
            vec!["aaaa1111", "aaaa2222"]
        );
        assert_eq!(resolve_sandbox(&config, "aaaa2").expect("one"), "aaaa2222");
        let e = resolve_sandbox(&config, "aaaa")
            .expect_err("two")
            .to_string();
        assert!(e.contains("aaaa1111") && e.contains("aaaa2222"), "{e}");
        let e = resolve_sandbox(&config, "zz")
            .expect_err("none")
            .to_string();
        assert!(
            e.contains("zz") && e.contains(&tmp.path().display().to_string()),
            "{e}"
        );
        let missing = Config {
            state_dir: tmp.path().join("nope"),
            ..Config::default()
        };
        assert!(sandbox_ids(&missing).expect("none").is_empty());
    }

    #[test]
    fn short_ids_are_twelve_chars() {
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn vmm_state_tells_dead_from_missing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = Config {
            state_dir: tmp.path().to_path_buf(),
            ..Config::default()
        };
        fs::create_dir(tmp.path().join("sb")).expect("mkdir");
        assert!(matches!(
            vmm_state(&config, "sb").expect("state"),
            VmmState::NoPidFile
        ));
        // Our own pid with a wrong start time: not a VMM.
        fs::write(
            tmp.path().join("sb/vmm.pid"),
            format!("{} 1\n", std::process::id()),
        )
        .expect("pid");
        assert!(matches!(
            vmm_state(&config, "sb").expect("state"),
            VmmState::Dead
        ));
    }
}
