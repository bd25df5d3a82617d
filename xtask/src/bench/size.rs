//! Phase 1: the size of the static musl agents `dist` built, against the
//! 1.85 MiB budget (x86_64), and whether they are stripped.

use std::fs;

use super::bins::Bins;
use super::table::{MIB, Row, row, verdict};
use crate::dist::thousands;

/// docs/design.md section 13: the stripped x86_64 musl agent.
const AGENT_SIZE_BUDGET: u64 = 1_939_865;

/// One row per release target's agent.
pub(super) fn agent_binaries(bins: &Bins, rows: &mut Vec<Row>) -> Result<(), String> {
    for (target, found) in &bins.dist {
        let budget = if target.starts_with("x86_64") {
            "≤ 1.85 MiB (1,939,865 B)"
        } else {
            "none (x86_64's is 1.85 MiB)"
        };
        match found {
            Ok(path) => {
                let bytes =
                    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let n = bytes.len() as u64;
                let stripped = match crate::elf::has_symtab(&bytes) {
                    Some(false) => "stripped: no .symtab",
                    Some(true) => "NOT stripped: has .symtab",
                    None => "not an ELF file",
                };
                let v = if target.starts_with("x86_64") {
                    verdict(n <= AGENT_SIZE_BUDGET)
                } else {
                    "-"
                };
                rows.push(row(
                    format!("agent binary, {target}"),
                    format!("{} B ({:.2} MiB)", thousands(n), n as f64 / MIB),
                    budget,
                    v,
                    format!("file size of `cargo xtask dist` output ({stripped}; fat LTO, opt-level z, panic=abort)"),
                ));
            }
            Err(why) => rows.push(row(
                format!("agent binary, {target}"),
                why.clone(),
                budget,
                "-",
                "",
            )),
        }
    }
    Ok(())
}
