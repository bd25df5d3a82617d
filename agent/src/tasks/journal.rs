//! `tasks.json`: the bounded journal of the tasks this agent accepted, by
//! signed id, with the server's id and the latest result. It is what
//! refuses replays (a signed id seen before under another server id), what
//! answers a duplicate delivery (the result again), and what tells, at the
//! next start, that a task was running when the agent stopped (reported
//! `interrupted`, never run again). Written atomically at every change.

use miniserde::{Deserialize, Serialize, json};

use crate::error::Error;
use crate::state::{StateDir, TASKS_JSON};

/// Entries kept. Expired tasks go first; past that the oldest goes (its
/// `not_after` still protects it: a task is refused once it has expired).
pub(crate) const MAX_ENTRIES: usize = 256;

/// One task as the journal remembers it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The signed id.
    pub(crate) id: String,
    /// The server's id of the delivery that ran.
    pub(crate) server_id: String,
    /// `not_after` in Unix seconds.
    pub(crate) not_after: u64,
    pub(crate) status: String,
    pub(crate) reason: Option<String>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) output: Option<String>,
    pub(crate) started: Option<String>,
    pub(crate) finished: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct JournalFile {
    tasks: Vec<Entry>,
}

/// The journal, loaded.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    entries: Vec<Entry>,
}

impl Journal {
    /// Reads `tasks.json`; a missing file is an empty journal. An unreadable
    /// one is an error: forgetting it would let replays through.
    pub(crate) fn load(state: &StateDir) -> Result<Self, Error> {
        let path = state.path(TASKS_JSON);
        if !path.exists() {
            return Ok(Journal::default());
        }
        let text = state.read_text(TASKS_JSON)?;
        let file: JournalFile = json::from_str(&text).map_err(|miniserde::Error| {
            Error::Invalid(format!(
                "{} is not a task journal; move it away to start a new one",
                path.display()
            ))
        })?;
        Ok(Journal {
            entries: file.tasks,
        })
    }

    /// The entry for a signed id.
    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The entry for a server id.
    pub(crate) fn by_server_id(&self, server_id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.server_id == server_id)
    }

    /// Entries whose last status is `status`.
    pub(crate) fn with_status<'a>(&'a self, status: &'a str) -> impl Iterator<Item = &'a Entry> {
        self.entries.iter().filter(move |e| e.status == status)
    }

    /// Records (or updates) an entry and writes the journal; `now` decides
    /// which entries have expired when room must be made.
    pub(crate) fn record(&mut self, state: &StateDir, entry: Entry, now: u64) -> Result<(), Error> {
        match self.entries.iter_mut().find(|e| e.id == entry.id) {
            Some(kept) => *kept = entry,
            None => {
                if self.entries.len() >= MAX_ENTRIES {
                    self.entries
                        .retain(|e| e.not_after >= now || e.status == "running");
                }
                if self.entries.len() >= MAX_ENTRIES {
                    let oldest = self
                        .entries
                        .iter()
                        .position(|e| e.status != "running")
                        .unwrap_or(0);
                    self.entries.remove(oldest);
                }
                self.entries.push(entry);
            }
        }
        self.save(state)
    }

    fn save(&self, state: &StateDir) -> Result<(), Error> {
        let file = JournalFile {
            tasks: self.entries.clone(),
        };
        state.write_atomic(TASKS_JSON, json::to_string(&file).as_bytes(), 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, not_after: u64, status: &str) -> Entry {
        Entry {
            id: id.into(),
            server_id: format!("s-{id}"),
            not_after,
            status: status.into(),
            reason: None,
            exit_code: None,
            output: None,
            started: None,
            finished: None,
        }
    }

    #[test]
    fn the_journal_survives_a_restart_and_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("stella-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::new(dir.clone());
        state.create().unwrap();
        let mut journal = Journal::load(&state).unwrap();
        journal
            .record(&state, entry("a", 10, "running"), 5)
            .unwrap();
        let mut done = entry("a", 10, "succeeded");
        done.output = Some("ok\n\"quoted\"".into());
        journal.record(&state, done.clone(), 5).unwrap();
        let again = Journal::load(&state).unwrap();
        assert_eq!(again.get("a"), Some(&done));
        for i in 0..MAX_ENTRIES + 10 {
            journal
                .record(
                    &state,
                    entry(&format!("t{i}"), 100 + i as u64, "succeeded"),
                    50,
                )
                .unwrap();
        }
        let again = Journal::load(&state).unwrap();
        assert_eq!(again.entries.len(), MAX_ENTRIES);
        // The expired one went first, then the oldest.
        assert!(again.get("a").is_none() && again.get("t0").is_none());
        assert!(again.get(&format!("t{}", MAX_ENTRIES + 9)).is_some());
        std::fs::write(state.path(TASKS_JSON), "garbage").unwrap();
        assert!(Journal::load(&state).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
