//! Executor child processes, polled from the scheduler and never waited on:
//! a child writes its stdout and stderr into one output file in the staging
//! dir (so no pipe can fill up and nothing blocks), `try_wait` tells when it
//! is done, and the task's output is the tail of that file — the last 64
//! lines, at most 8 KiB. A chatty child cannot fill the disk: past 1 MiB the
//! file is cut back to its tail.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use stella_proto::task::MAX_OUTPUT_BYTES as OUTPUT_BYTES;

/// Size past which the output file is cut back to its tail.
const OUTPUT_FILE_CAP: u64 = 1 << 20;

/// The output file of the task that runs.
pub(crate) struct Output {
    path: PathBuf,
    file: File,
    /// The tail kept when the file was last cut back.
    carried: Vec<u8>,
}

impl Output {
    /// A new, empty output file at `path`.
    pub(crate) fn create(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // Children append: a cut-back file is written at its new end.
        drop(file);
        let file = OpenOptions::new().append(true).read(true).open(path)?;
        Ok(Output {
            path: path.to_owned(),
            file,
            carried: Vec::new(),
        })
    }

    /// Writes a line of the agent's own (what it runs, what it decided).
    pub(crate) fn note(&mut self, line: &str) {
        let _ = writeln!(self.file, "{line}");
    }

    fn stdio(&self) -> std::io::Result<(Stdio, Stdio)> {
        Ok((
            Stdio::from(self.file.try_clone()?),
            Stdio::from(self.file.try_clone()?),
        ))
    }

    /// Cuts the file back to its tail once it passes the cap.
    fn keep_bounded(&mut self) {
        let len = self.file.metadata().map_or(0, |m| m.len());
        if len > OUTPUT_FILE_CAP {
            self.carried = self.read_tail();
            let _ = self.file.set_len(0);
        }
    }

    fn read_tail(&self) -> Vec<u8> {
        let mut bytes = self.carried.clone();
        let len = self.file.metadata().map_or(0, |m| m.len());
        let from = len.saturating_sub(OUTPUT_BYTES as u64);
        let mut file = &self.file;
        if file.seek(SeekFrom::Start(from)).is_ok() {
            let _ = file.take(OUTPUT_BYTES as u64).read_to_end(&mut bytes);
        }
        let cut = bytes.len().saturating_sub(OUTPUT_BYTES);
        bytes.drain(..cut);
        bytes
    }

    /// The last bytes written (at most 8 KiB; `output_tail` makes the
    /// result's output of them).
    pub(crate) fn tail(&self) -> String {
        String::from_utf8_lossy(&self.read_tail()).into_owned()
    }

    /// The output written since `offset` (a mark from `len`).
    pub(crate) fn tail_since(&self, offset: u64) -> String {
        let len = self.len();
        if offset > len {
            return self.tail();
        }
        let mut bytes = Vec::new();
        let from = offset.max(len.saturating_sub(OUTPUT_BYTES as u64));
        let mut file = &self.file;
        if file.seek(SeekFrom::Start(from)).is_ok() {
            let _ = file.take(OUTPUT_BYTES as u64).read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes in the file now.
    pub(crate) fn len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// Removes the file.
    pub(crate) fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A child process of the running task.
pub(crate) struct Running {
    child: Child,
}

/// How a poll found the child.
pub(crate) enum Poll {
    Busy,
    Exited(ExitStatus),
}

impl Running {
    /// Starts `program args…` writing into `output`, after noting the
    /// command line there.
    pub(crate) fn spawn(
        output: &mut Output,
        program: &str,
        args: &[String],
    ) -> std::io::Result<Self> {
        output.note(&format!("$ {program} {}", args.join(" ")));
        let (out, err) = output.stdio()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Running { child })
    }

    /// Whether the child is done, without waiting.
    pub(crate) fn poll(&mut self, output: &mut Output) -> Poll {
        output.keep_bounded();
        match self.child.try_wait() {
            Ok(Some(status)) => Poll::Exited(status),
            Ok(None) => Poll::Busy,
            // Cannot happen for our own child; treat it as gone.
            Err(_) => Poll::Exited(std::os::unix::process::ExitStatusExt::from_raw(1 << 8)),
        }
    }

    /// Kills the child and reaps it (a killed child exits at once).
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_polled_and_its_output_kept() {
        let dir = std::env::temp_dir().join(format!("stella-runner-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut output = Output::create(&dir.join("out")).unwrap();
        let mut child = Running::spawn(
            &mut output,
            "sh",
            &["-c".into(), "echo out; echo err >&2; exit 3".into()],
        )
        .unwrap();
        let status = loop {
            if let Poll::Exited(s) = child.poll(&mut output) {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(
            output.tail(),
            "$ sh -c echo out; echo err >&2; exit 3\nout\nerr\n"
        );
        let mark = output.len();
        output.note("later");
        assert_eq!(output.tail_since(mark), "later\n");
        output.remove();
        let _ = fs::remove_dir_all(&dir);
    }
}
