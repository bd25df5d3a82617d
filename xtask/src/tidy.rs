//! Tidy checks run by `cargo test`: every Rust file starts with a `//!` module
//! doc saying what it owns (as rust-analyzer's tidy test requires).

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && name != ".git" && name != "fuzz" {
                    rust_files(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_rust_file_starts_with_a_module_doc() {
        let root = crate::project_root();
        let mut files = Vec::new();
        for part in ["proto", "agent", "server", "xtask", "tests", "bench"] {
            rust_files(&root.join(part), &mut files);
        }
        assert!(
            files.len() > 20,
            "found only {} files under {}",
            files.len(),
            root.display()
        );
        let missing: Vec<_> = files
            .iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                !text.trim_start().starts_with("//!")
            })
            .collect();
        assert!(
            missing.is_empty(),
            "files without a //! module doc: {missing:?}"
        );
    }
}
