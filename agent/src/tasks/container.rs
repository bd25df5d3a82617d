//! The `container` executor: deploys an image by digest with the podman or
//! docker CLI, each step a child process polled from the scheduler. With an
//! `image_archive`, the archive is fetched from the server (`artifact`),
//! checked against its sha256 and loaded (`load -i`), and the image is run
//! with `--pull=never` (air-gapped). Replacement: the new container starts
//! under a temporary name, its health command must pass (retried until the
//! health timeout), then the old container is removed and the new one takes
//! the name. A failed health check removes the new container and keeps the
//! old one running. With published ports the old container is stopped
//! before the new one starts (two cannot hold one port) and started again
//! if the new one fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stella_proto::states::TaskStatus;
use stella_proto::task::ContainerTask;

use super::artifact::{Fetch, Fetched};
use super::runner::{Output, Poll, Running};
use super::{Ctx, Outcome};

/// Wait between two health checks.
const HEALTH_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Fetch,
    Load,
    CheckOld,
    StopOld,
    Run,
    Health,
    RemoveOld,
    Rename,
    RemoveNew,
    RestartOld,
    Done,
}

/// A container deployment in progress.
pub(crate) struct ContainerJob {
    spec: ContainerTask,
    cli: &'static str,
    /// The new container's name until it is healthy.
    temp_name: String,
    phase: Phase,
    child: Option<Running>,
    fetch: Option<Fetch>,
    archive: Option<PathBuf>,
    old_exists: bool,
    old_stopped: bool,
    health_deadline: Instant,
    next_health: Instant,
    /// Where the last health check's output starts in the output file.
    health_mark: u64,
    /// Decided already (a failure, timeout or cancellation), cleaning up.
    outcome: Option<Outcome>,
}

impl ContainerJob {
    /// A deployment of `spec` with `cli` (`podman` or `docker`).
    pub(crate) fn new(spec: ContainerTask, cli: &'static str, server_id: &str) -> Self {
        let short = &server_id[..server_id.len().min(12)];
        ContainerJob {
            temp_name: format!("{}-stella-{short}", spec.name),
            phase: if spec.image_archive.is_some() {
                Phase::Fetch
            } else {
                Phase::CheckOld
            },
            spec,
            cli,
            child: None,
            fetch: None,
            archive: None,
            old_exists: false,
            old_stopped: false,
            health_deadline: Instant::now(),
            next_health: Instant::now(),
            health_mark: 0,
            outcome: None,
        }
    }

    fn args(&self) -> Vec<String> {
        let s = |x: &str| x.to_owned();
        let spec = &self.spec;
        match self.phase {
            Phase::Load => vec![
                s("load"),
                s("-i"),
                self.archive
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ],
            Phase::CheckOld => vec![
                s("container"),
                s("inspect"),
                s("--format"),
                s("{{.Name}}"),
                spec.name.clone(),
            ],
            Phase::StopOld => vec![s("stop"), spec.name.clone()],
            Phase::Run => {
                let mut args = vec![s("run"), s("-d"), s("--name"), self.temp_name.clone()];
                if spec.image_archive.is_some() {
                    args.push(s("--pull=never"));
                }
                for (k, v) in &spec.env {
                    args.push(s("--env"));
                    args.push(format!("{k}={v}"));
                }
                for port in &spec.ports {
                    args.push(s("--publish"));
                    args.push(port.clone());
                }
                args.push(spec.image.clone());
                args
            }
            Phase::Health => {
                let mut args = vec![s("exec"), self.temp_name.clone()];
                if let Some(h) = &spec.health {
                    args.extend(h.cmd.iter().cloned());
                }
                args
            }
            Phase::RemoveOld => vec![s("rm"), s("-f"), spec.name.clone()],
            Phase::Rename => vec![s("rename"), self.temp_name.clone(), spec.name.clone()],
            Phase::RemoveNew => vec![s("rm"), s("-f"), self.temp_name.clone()],
            Phase::RestartOld => vec![s("start"), spec.name.clone()],
            Phase::Fetch | Phase::Done => Vec::new(),
        }
    }

    /// The step after `phase` ended with `ok`.
    fn advance(&mut self, ok: bool, code: Option<i32>, output: &mut Output) {
        let failed = |job: &mut Self, reason: String| {
            job.outcome.get_or_insert(Outcome {
                status: TaskStatus::Failed,
                reason: Some(reason),
                exit_code: code,
            });
        };
        self.phase = match self.phase {
            Phase::Fetch => Phase::Load,
            Phase::Load if ok => {
                if let Some(path) = self.archive.take() {
                    Fetch::discard(&path);
                }
                Phase::CheckOld
            }
            Phase::Load => {
                failed(self, format!("{} load failed", self.cli));
                Phase::Done
            }
            Phase::CheckOld => {
                self.old_exists = ok;
                if ok && !self.spec.ports.is_empty() {
                    Phase::StopOld
                } else {
                    Phase::Run
                }
            }
            Phase::StopOld if ok => {
                self.old_stopped = true;
                Phase::Run
            }
            Phase::StopOld => {
                failed(
                    self,
                    format!("cannot stop the old container {}", self.spec.name),
                );
                Phase::Done
            }
            Phase::Run if ok => match &self.spec.health {
                Some(h) => {
                    self.health_deadline = Instant::now() + h.timeout;
                    self.next_health = Instant::now();
                    Phase::Health
                }
                None if self.old_exists => Phase::RemoveOld,
                None => Phase::Rename,
            },
            Phase::Run => {
                failed(self, format!("{} run {} failed", self.cli, self.spec.image));
                Phase::RemoveNew
            }
            Phase::Health if ok => {
                output.note("health check passed");
                if self.old_exists {
                    Phase::RemoveOld
                } else {
                    Phase::Rename
                }
            }
            Phase::Health if Instant::now() + HEALTH_RETRY < self.health_deadline => {
                self.next_health = Instant::now() + HEALTH_RETRY;
                Phase::Health
            }
            Phase::Health => {
                let said = output.tail_since(self.health_mark);
                let last = said.lines().last().unwrap_or("").to_owned();
                failed(
                    self,
                    format!(
                        "health check failed{}: {last}; the new container was removed{}",
                        code.map(|c| format!(" (exit {c})")).unwrap_or_default(),
                        if self.old_exists {
                            ", the old one kept"
                        } else {
                            ""
                        }
                    ),
                );
                Phase::RemoveNew
            }
            Phase::RemoveOld if ok => Phase::Rename,
            Phase::RemoveOld => {
                failed(
                    self,
                    format!("cannot remove the old container {}", self.spec.name),
                );
                Phase::RemoveNew
            }
            Phase::Rename if ok => {
                self.outcome.get_or_insert(Outcome {
                    status: TaskStatus::Succeeded,
                    reason: None,
                    exit_code: Some(0),
                });
                Phase::Done
            }
            Phase::Rename => {
                failed(
                    self,
                    format!("cannot rename {} to {}", self.temp_name, self.spec.name),
                );
                Phase::Done
            }
            Phase::RemoveNew if self.old_stopped => Phase::RestartOld,
            Phase::RemoveNew | Phase::RestartOld | Phase::Done => Phase::Done,
        };
    }

    /// One scheduler turn: the result once the deployment is over.
    pub(crate) fn poll(&mut self, ctx: &mut Ctx<'_>, output: &mut Output) -> Option<Outcome> {
        if let Some(child) = &mut self.child {
            match child.poll(output) {
                Poll::Busy => return None,
                Poll::Exited(status) => {
                    self.child = None;
                    self.advance(status.success(), status.code(), output);
                }
            }
        }
        loop {
            match self.phase {
                Phase::Done => {
                    if let Some(path) = self.archive.take() {
                        Fetch::discard(&path);
                    }
                    return Some(self.outcome.take().unwrap_or(Outcome {
                        status: TaskStatus::Failed,
                        reason: Some("the deployment ended without a result".into()),
                        exit_code: None,
                    }));
                }
                Phase::Fetch => {
                    let sha = self.spec.image_archive.clone().unwrap_or_default();
                    let fetch = self.fetch.get_or_insert_with(|| {
                        output.note(&format!("fetching artifact {sha}"));
                        Fetch::start(ctx.state, &sha)
                    });
                    match fetch.step(ctx.state, ctx.client, ctx.server) {
                        Ok(Fetched::Busy) => return None,
                        Ok(Fetched::Done(path)) => {
                            output.note(&format!(
                                "artifact {sha} verified ({} bytes)",
                                fetch.received()
                            ));
                            self.fetch = None;
                            self.archive = Some(path);
                            self.advance(true, None, output);
                        }
                        Err(e) => {
                            output.note(&e);
                            self.fetch = None;
                            self.outcome = Some(Outcome {
                                status: TaskStatus::Failed,
                                reason: Some(e),
                                exit_code: None,
                            });
                            self.phase = Phase::Done;
                        }
                    }
                }
                Phase::Health if Instant::now() < self.next_health => return None,
                _ => {
                    if self.phase == Phase::Health {
                        self.health_mark = output.len();
                    }
                    let args = self.args();
                    match Running::spawn(output, self.cli, &args) {
                        Ok(child) => {
                            self.child = Some(child);
                            return None;
                        }
                        Err(e) => {
                            output.note(&format!("cannot run {}: {e}", self.cli));
                            self.advance(false, None, output);
                        }
                    }
                }
            }
        }
    }

    /// Stops the deployment (timeout or cancellation): the running step is
    /// killed and what was started is undone (a new container removed, an
    /// old one started again). Once the old container is being removed the
    /// new one is healthy, and the deployment finishes instead.
    pub(crate) fn abort(&mut self, status: TaskStatus, reason: String, output: &mut Output) {
        if matches!(self.phase, Phase::RemoveOld | Phase::Rename) || self.outcome.is_some() {
            return;
        }
        output.note(&reason);
        if let Some(child) = self.child.take() {
            child.kill();
        }
        self.outcome = Some(Outcome {
            status,
            reason: Some(reason),
            exit_code: None,
        });
        self.phase = match self.phase {
            Phase::Run | Phase::Health => Phase::RemoveNew,
            _ if self.old_stopped => Phase::RestartOld,
            _ => Phase::Done,
        };
    }
}
