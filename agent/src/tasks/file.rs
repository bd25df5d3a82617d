//! The `file` executor, which every agent has: writes one file atomically
//! (temp file with the mode, fsync, rename, fsync of the directory). Paths
//! must be absolute, without `..`, and outside the agent's state dir and
//! binary; the same content already in place is a no-op ("unchanged").

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

/// What the executor did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wrote {
    Written,
    Unchanged,
}

/// Why a path may not be written, or `None` when it may. `state_dir` and
/// `binary` are the agent's own (absolute) paths.
pub(crate) fn refuse_path(path: &str, state_dir: &Path, binary: Option<&Path>) -> Option<String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Some(format!("path {path:?} is not absolute"));
    }
    if p.components().any(|c| c == Component::ParentDir) || path.contains('\0') {
        return Some(format!("path {path:?} contains \"..\""));
    }
    if p.file_name().is_none() || path.ends_with('/') {
        return Some(format!("path {path:?} names no file"));
    }
    // Compared as given and with symlinks in the parents resolved (a
    // link into the state dir is the state dir).
    let resolved = p
        .parent()
        .and_then(|dir| fs::canonicalize(dir).ok())
        .map(|dir| dir.join(p.file_name().unwrap_or_default()));
    let candidates = [Some(p.to_owned()), resolved];
    let state_real = fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    for candidate in candidates.iter().flatten() {
        if candidate.starts_with(state_dir) || candidate.starts_with(&state_real) {
            return Some(format!(
                "path {path:?} is inside the agent's state dir {}",
                state_dir.display()
            ));
        }
        if let Some(binary) = binary {
            // The binary and its update siblings (`.new`, `.prev`).
            let same_dir = candidate.parent() == binary.parent();
            let name = candidate.file_name().unwrap_or_default().to_string_lossy();
            let own = binary.file_name().unwrap_or_default().to_string_lossy();
            if same_dir && (name == own || name.starts_with(&format!("{own}."))) {
                return Some(format!(
                    "path {path:?} is the agent's binary {}",
                    binary.display()
                ));
            }
        }
    }
    None
}

/// Writes `content` at `path` with `mode`, unless it is there already.
pub(crate) fn write(path: &str, content: &[u8], mode: u32) -> std::io::Result<Wrote> {
    let target = Path::new(path);
    if let Ok(meta) = fs::symlink_metadata(target)
        && meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && meta.len() == content.len() as u64
        && fs::read(target)? == content
    {
        return Ok(Wrote::Unchanged);
    }
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let tmp = target.with_file_name(format!(".{name}.stella-tmp"));
    crate::state::write_file_atomically(target, &tmp, content, mode)?;
    Ok(Wrote::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let state = Path::new("/var/lib/stella-agent");
        let bin = Path::new("/usr/local/bin/stella-agent");
        for (path, why) in [
            ("etc/x", "not absolute"),
            ("/etc/../var/lib/stella-agent/agent.key", "\"..\""),
            ("/var/lib/stella-agent/agent.key", "state dir"),
            ("/var/lib/stella-agent", "state dir"),
            ("/usr/local/bin/stella-agent", "binary"),
            ("/usr/local/bin/stella-agent.prev", "binary"),
            ("/etc/", "names no file"),
        ] {
            let refusal = refuse_path(path, state, Some(bin)).unwrap_or_default();
            assert!(refusal.contains(why), "{path}: {refusal}");
        }
        assert_eq!(refuse_path("/etc/motd", state, Some(bin)), None);
        assert_eq!(refuse_path("/usr/local/bin/other", state, Some(bin)), None);
    }

    #[test]
    fn a_second_write_of_the_same_content_is_a_no_op() {
        let dir = std::env::temp_dir().join(format!("stella-file-task-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("motd");
        let path = path.to_str().unwrap();
        assert_eq!(write(path, b"hello\n", 0o640).unwrap(), Wrote::Written);
        assert_eq!(write(path, b"hello\n", 0o640).unwrap(), Wrote::Unchanged);
        assert_eq!(
            fs::metadata(path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(write(path, b"hello\n", 0o644).unwrap(), Wrote::Written);
        assert_eq!(write(path, b"bye\n", 0o644).unwrap(), Wrote::Written);
        assert_eq!(fs::read(path).unwrap(), b"bye\n");
        let _ = fs::remove_dir_all(&dir);
    }
}
