//! The store conformance suite: the same tests, written once against the
//! `Store` trait, run against every backend (each backend's test module
//! invokes `store_conformance!` with a constructor of an empty store). Also
//! the records the tests and the crash-consistency tests build.

use stella_proto::api::{DoctorDirective, DoctorReport, Labels, Platform, UpdateFailureReport};
use stella_proto::states::{TaskStatus, UpdatePhase};

use super::{EnrollmentState, NewEnrollment, Store, StoreError};
use crate::records::{
    AdminTokenRecord, AgentRecord, AgentStatus, CertRecord, DoctorReportRecord, HeartbeatState,
    ReleaseFile, ReleaseRecord, RolloutRecord, TaskRecord, TaskResultRecord, TokenRecord,
    UpdateFailureRecord,
};
use crate::refusal::Refusal;

/// The admin token hash every test store is created with.
pub(crate) const ADMIN_SHA256: &str = "ab12";

/// Makes an empty store.
pub(crate) type MakeStore<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// Generates one `#[test]` per conformance test for a backend; or, as
/// `store_conformance!(@cases)`, the list of `(name, test)` for a backend
/// that runs them all in one `#[test]` (PostgreSQL: one server for all).
/// A new case goes in the one list below.
macro_rules! store_conformance {
    (@cases) => {
        $crate::store::conformance::store_conformance! { @list cases }
    };
    (@list $mode:ident $($make:expr)?) => {
        $crate::store::conformance::store_conformance! { @$mode $($make)?;
            admin_token_hash_is_kept,
            tokens_are_recorded_once,
            an_enrollment_writes_everything_or_nothing,
            an_enrollment_retry_sees_the_earlier_one,
            agents_change_atomically_with_audit_lines,
            certificates_are_replaced_with_their_agent,
            heartbeats_are_saved_in_batches,
            configs_get_versions,
            releases_are_recorded_once,
            rollouts_are_replaced_whole,
            doctor_reports_clear_the_request,
            update_failures_are_kept_per_agent,
            tasks_are_recorded_once_and_results_upserted,
            admin_tokens_are_recorded_and_revoked_with_audit_lines,
            audit_lines_carry_who_and_read_in_pages,
            a_snapshot_restores_into_an_equal_store,
            blobs_are_stored_whole_once_and_copied_back,
        }
    };
    (@tests $make:expr; $($name:ident,)*) => {$(
        #[test]
        fn $name() {
            $crate::store::conformance::$name(&$make);
        }
    )*};
    (@cases; $($name:ident,)*) => {
        [$((
            stringify!($name),
            $crate::store::conformance::$name as fn($crate::store::conformance::MakeStore<'_>),
        ),)*]
    };
    ($make:expr) => {
        $crate::store::conformance::store_conformance! { @list tests $make }
    };
}
pub(crate) use store_conformance;

pub(crate) fn token(id: &str, uses: u32) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        secret_sha256: "00".repeat(32),
        created_at: 100,
        expires_at: 10_000,
        uses,
        uses_left: uses,
        labels: Labels::from([("env".to_owned(), "prod".to_owned())]),
    }
}

pub(crate) fn agent(id: &str, serial: &str) -> AgentRecord {
    AgentRecord {
        id: id.to_owned(),
        name: format!("host-{id}"),
        status: AgentStatus::Active,
        reason: None,
        labels: Labels::new(),
        platform: Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
            target: "x86_64-unknown-linux-musl".into(),
        },
        version: "1.0.0".into(),
        capabilities: vec!["systemd".into()],
        enrolled_at: 100,
        token_id: "abcdef".into(),
        key_sha256: "k1".into(),
        cert_serial: serial.to_owned(),
        cert_not_after: 1_000,
        previous_serial: None,
        renew_requested: false,
        update_offer: None,
        doctor_request: None,
    }
}

pub(crate) fn cert(agent_id: &str, serial: &str) -> CertRecord {
    CertRecord {
        agent_id: agent_id.to_owned(),
        serial: serial.to_owned(),
        pem: format!("PEM {serial}"),
        issued_at: 100,
        not_after: 1_000,
    }
}

pub(crate) fn rollout(id: &str, status: &str) -> RolloutRecord {
    RolloutRecord {
        id: id.to_owned(),
        release: "1.1.0".into(),
        stages: vec!["count:1".into(), "100".into()],
        soak_ms: 1_000,
        max_failures: 0.05,
        selector: Labels::new(),
        status: status.to_owned(),
        reason: None,
        open_stage: 0,
        healthy_since_ms: 0,
        created_at: 100,
        ignored_failures: Vec::new(),
        agent_timeout_ms: Some(60_000),
        window: Some("22:00-04:00".into()),
        days: Some("mon-fri".into()),
        stage_opened_ms: Some(100_000),
        resumed_ms: None,
    }
}

/// Enrolls `agent_id` with one use of `token_id` (which must exist), as the
/// `tokens` rules would: consume a use, record agent and certificate.
pub(crate) fn enroll(
    store: &dyn Store,
    token_id: &str,
    agent_id: &str,
    serial: &str,
) -> Result<(), StoreError> {
    store.enroll(token_id, "key", &mut |state: &EnrollmentState| {
        let mut token = state.token.clone().expect("the token exists");
        token.uses_left -= 1;
        Ok(Some(NewEnrollment {
            token,
            agent: agent(agent_id, serial),
            cert: cert(agent_id, serial),
            at: 200,
        }))
    })
}

fn agents(store: &dyn Store) -> Vec<(AgentRecord, HeartbeatState)> {
    let mut out = Vec::new();
    store
        .load_agents(&mut |a, hb| out.push((a, hb)))
        .expect("load agents");
    out
}

pub(crate) fn admin_token_hash_is_kept(make: MakeStore<'_>) {
    assert_eq!(make().admin_token_sha256().unwrap(), ADMIN_SHA256);
}

pub(crate) fn tokens_are_recorded_once(make: MakeStore<'_>) {
    let store = make();
    assert!(store.token("abcdef").unwrap().is_none());
    store.insert_token(&token("abcdef", 2)).unwrap();
    assert_eq!(store.token("abcdef").unwrap().unwrap().uses_left, 2);
    assert!(matches!(
        store.insert_token(&token("abcdef", 5)),
        Err(StoreError::Exists { .. })
    ));
    assert_eq!(store.token("abcdef").unwrap().unwrap().uses, 2);
    let audit = store.audit_log().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].action.as_str(), audit[0].subject.as_str()),
        ("token.create", "abcdef")
    );
}

pub(crate) fn an_enrollment_writes_everything_or_nothing(make: MakeStore<'_>) {
    let store = make();
    // An unknown token: the rule sees none, and its refusal writes nothing.
    let refused = store.enroll("nosuch", "key", &mut |state| {
        assert!(state.token.is_none() && state.prior.is_none());
        Err(Refusal::unauthorized("token nosuch is not known"))
    });
    assert!(matches!(refused, Err(StoreError::Aborted(r)) if r.status() == 401));
    store.insert_token(&token("abcdef", 2)).unwrap();
    // A rule that writes nothing leaves everything as it was.
    store.enroll("abcdef", "key", &mut |_| Ok(None)).unwrap();
    assert!(agents(store.as_ref()).is_empty());
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    assert_eq!(store.token("abcdef").unwrap().unwrap().uses_left, 1);
    let all = agents(store.as_ref());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0.id, "agt_a");
    assert_eq!(all[0].1.last_heartbeat_ms, 0, "no heartbeat yet");
    assert_eq!(store.agent("agt_a").unwrap().unwrap().cert_serial, "01");
    assert_eq!(store.cert("01").unwrap().unwrap().agent_id, "agt_a");
    assert!(store.agent("agt_b").unwrap().is_none());
    assert!(
        store
            .audit_log()
            .unwrap()
            .iter()
            .any(|l| l.action == "agent.enroll" && l.subject == "agt_a")
    );
}

pub(crate) fn an_enrollment_retry_sees_the_earlier_one(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 1)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    let mut seen = None;
    store
        .enroll("abcdef", "key", &mut |state| {
            seen = state.prior.clone();
            assert_eq!(state.token.as_ref().unwrap().uses_left, 0);
            Ok(None)
        })
        .unwrap();
    let prior = seen.expect("the earlier enrollment of the same token and key");
    assert_eq!((prior.at, prior.agent.id.as_str()), (200, "agt_a"));
    assert_eq!(prior.cert.serial, "01");
    // Another key of the same token has no earlier enrollment.
    store
        .enroll("abcdef", "other-key", &mut |state| {
            assert!(state.prior.is_none());
            Ok(None)
        })
        .unwrap();
}

pub(crate) fn agents_change_atomically_with_audit_lines(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 2)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    enroll(store.as_ref(), "abcdef", "agt_b", "02").unwrap();
    let audit_before = store.audit_log().unwrap().len();
    let written = store
        .update_agents(&["agt_a", "agt_b"], 300, "agent.test", &mut |r| {
            let change = r.id == "agt_a";
            if change {
                r.status = AgentStatus::Revoked;
            }
            Ok(change)
        })
        .unwrap();
    assert_eq!(written.len(), 1, "only changed records are written");
    assert_eq!(
        store.agent("agt_a").unwrap().unwrap().status,
        AgentStatus::Revoked
    );
    let audit = store.audit_log().unwrap();
    assert_eq!(audit.len(), audit_before + 1);
    let line = audit.last().unwrap();
    assert_eq!(
        (line.at, line.action.as_str(), line.subject.as_str()),
        (300, "agent.test", "agt_a")
    );
    assert_eq!(line.detail, "active/- -> revoked/-");
    // A refusal for the second agent leaves the first unchanged too.
    let refused = store.update_agents(&["agt_b", "agt_a"], 301, "agent.test", &mut |r| {
        if r.id == "agt_a" {
            return Err(Refusal::conflict("no"));
        }
        r.name = "renamed".into();
        Ok(true)
    });
    assert!(matches!(refused, Err(StoreError::Aborted(_))));
    assert_eq!(store.agent("agt_b").unwrap().unwrap().name, "host-agt_b");
    // An unknown id fails the call.
    assert!(matches!(
        store.update_agents(&["agt_x"], 302, "agent.test", &mut |_| Ok(true)),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.audit_log().unwrap().len(), audit_before + 1);
}

pub(crate) fn certificates_are_replaced_with_their_agent(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 1)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    let new = cert("agt_a", "02");
    let record = store
        .replace_certificate(
            &new,
            Box::new(|r| {
                r.previous_serial = Some(r.cert_serial.clone());
                r.cert_serial = "02".into();
                Ok("serial=02".into())
            }),
        )
        .unwrap();
    assert_eq!(record.cert_serial, "02");
    let stored = store.agent("agt_a").unwrap().unwrap();
    assert_eq!(
        (
            stored.cert_serial.as_str(),
            stored.previous_serial.as_deref()
        ),
        ("02", Some("01"))
    );
    assert_eq!(store.cert("02").unwrap().unwrap().pem, "PEM 02");
    assert!(store.cert("01").unwrap().is_some(), "old certificates stay");
    let line = store.audit_log().unwrap().pop().unwrap();
    assert_eq!(
        (line.action.as_str(), line.detail.as_str()),
        ("agent.certificate", "serial=02")
    );
    // Refused: neither the certificate nor the agent changes.
    let refused = store.replace_certificate(
        &cert("agt_a", "03"),
        Box::new(|_| Err(Refusal::unauthorized("superseded"))),
    );
    assert!(matches!(refused, Err(StoreError::Aborted(_))));
    assert!(store.cert("03").unwrap().is_none());
    assert_eq!(store.agent("agt_a").unwrap().unwrap().cert_serial, "02");
    assert!(matches!(
        store.replace_certificate(&cert("agt_x", "04"), Box::new(|_| Ok(String::new()))),
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.cert("04").unwrap().is_none());
}

pub(crate) fn heartbeats_are_saved_in_batches(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 2)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    enroll(store.as_ref(), "abcdef", "agt_b", "02").unwrap();
    store.save_heartbeats(&[]).unwrap();
    let hb = |seq| HeartbeatState {
        last_heartbeat_ms: 5_000 + seq,
        seq,
        version: "1.0.1".into(),
        ..HeartbeatState::default()
    };
    store
        .save_heartbeats(&[("agt_a".into(), hb(1)), ("agt_b".into(), hb(2))])
        .unwrap();
    store.save_heartbeats(&[("agt_a".into(), hb(3))]).unwrap();
    let mut all = agents(store.as_ref());
    all.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let seqs: Vec<(String, u64, String)> = all
        .into_iter()
        .map(|(a, hb)| (a.id, hb.seq, hb.version))
        .collect();
    assert_eq!(
        seqs,
        [
            ("agt_a".to_owned(), 3, "1.0.1".to_owned()),
            ("agt_b".to_owned(), 2, "1.0.1".to_owned())
        ]
    );
}

pub(crate) fn doctor_reports_clear_the_request(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 1)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    assert!(store.doctor_report("agt_a").unwrap().is_none());
    store
        .update_agents(&["agt_a"], 10, "agent.doctor_requested", &mut |r| {
            r.doctor_request = Some(DoctorDirective {
                remediate_dry_run: true,
            });
            Ok(true)
        })
        .unwrap();
    let report = DoctorReportRecord {
        received_at: 20,
        report: DoctorReport {
            checks: Vec::new(),
            summary: Default::default(),
            remediation: None,
        },
    };
    let written = store.put_doctor_report("agt_a", &report).unwrap();
    assert_eq!(written.doctor_request, None);
    assert_eq!(store.agent("agt_a").unwrap().unwrap().doctor_request, None);
    assert_eq!(store.doctor_report("agt_a").unwrap(), Some(report.clone()));
    assert_eq!(
        store.audit_log().unwrap().last().unwrap().action,
        "agent.doctor_report"
    );
    assert!(matches!(
        store.put_doctor_report("agt_x", &report),
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.doctor_report("agt_x").unwrap().is_none());
}

pub(crate) fn update_failures_are_kept_per_agent(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 1)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    assert!(store.update_failure("agt_a").unwrap().is_none());
    let failure = |version: &str, lines: usize| UpdateFailureRecord {
        received_at: 30,
        report: UpdateFailureReport {
            version: version.to_owned(),
            phase: UpdatePhase::RolledBack,
            reason: "doctor failed".into(),
            lines: (0..lines).map(|i| format!("line {i}")).collect(),
        },
    };
    store
        .put_update_failure("agt_a", &failure("1.1.0", 64))
        .unwrap();
    store
        .put_update_failure("agt_a", &failure("1.2.0", 2))
        .unwrap();
    assert_eq!(
        store.update_failure("agt_a").unwrap(),
        Some(failure("1.2.0", 2)),
        "the last one replaces the one before"
    );
    let audit = store.audit_log().unwrap();
    let last = audit.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.detail.as_str()),
        ("agent.update_failed", "rolled_back 1.2.0: doctor failed")
    );
    assert!(matches!(
        store.put_update_failure("agt_x", &failure("1.1.0", 1)),
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.update_failure("agt_x").unwrap().is_none());
}

pub(crate) fn configs_get_versions(make: MakeStore<'_>) {
    let store = make();
    assert!(store.configs().unwrap().is_empty());
    let first = store.set_config("global", "{}", "h1", 100).unwrap();
    let second = store.set_config("global", r#"{"a":1}"#, "h2", 101).unwrap();
    let label = store.set_config("label:env=prod", "{}", "h3", 102).unwrap();
    assert_eq!((first.version, second.version, label.version), (1, 2, 1));
    let all = store.configs().unwrap();
    assert_eq!(all.len(), 2);
    let global = all.iter().find(|c| c.scope == "global").unwrap();
    assert_eq!(
        (
            global.version,
            global.doc.as_str(),
            global.hash.as_str(),
            global.updated_at
        ),
        (2, r#"{"a":1}"#, "h2", 101)
    );
    let lines = store.audit_log().unwrap();
    assert_eq!(lines.iter().filter(|l| l.action == "config.set").count(), 3);
}

pub(crate) fn releases_are_recorded_once(make: MakeStore<'_>) {
    let store = make();
    let release = |envelope: &str| ReleaseRecord {
        version: "1.1.0".into(),
        envelope: envelope.into(),
        files: vec![ReleaseFile {
            name: "x86_64-unknown-linux-musl/stella-agent".into(),
            sha256: "aa".into(),
            size: 10,
        }],
        imported_at: 100,
    };
    assert!(store.insert_release(&release("e1")).unwrap().is_none());
    let existing = store.insert_release(&release("e2")).unwrap();
    assert_eq!(existing.unwrap().envelope, "e1", "the first stays");
    let all = store.releases().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].files[0].size, 10);
}

pub(crate) fn rollouts_are_replaced_whole(make: MakeStore<'_>) {
    let store = make();
    store
        .put_rollout(
            &rollout("rol_a", "running"),
            None,
            100,
            "rollout.start",
            "d",
        )
        .unwrap();
    store
        .put_rollout(
            &rollout("rol_b", "running"),
            None,
            101,
            "rollout.start",
            "d",
        )
        .unwrap();
    let mut paused = rollout("rol_a", "paused");
    paused.reason = Some("why".into());
    // A write over a state that is no longer stored (another server
    // changed it) is refused, and changes nothing.
    let stale = store.put_rollout(
        &paused,
        Some(&rollout("rol_a", "paused")),
        102,
        "rollout.pause",
        "why",
    );
    assert!(
        matches!(&stale, Err(StoreError::Aborted(r)) if r.why == crate::refusal::Why::Conflict),
        "{stale:?}"
    );
    store
        .put_rollout(
            &paused,
            Some(&rollout("rol_a", "running")),
            102,
            "rollout.pause",
            "why",
        )
        .unwrap();
    let all = store.rollouts().unwrap();
    assert_eq!(all.len(), 2);
    let a = all.iter().find(|r| r.id == "rol_a").unwrap();
    assert_eq!(
        (a.status.as_str(), a.reason.as_deref()),
        ("paused", Some("why"))
    );
    assert_eq!(
        (
            a.agent_timeout_ms,
            a.window.as_deref(),
            a.days.as_deref(),
            a.stage_opened_ms
        ),
        (
            Some(60_000),
            Some("22:00-04:00"),
            Some("mon-fri"),
            Some(100_000)
        )
    );
    let line = store.audit_log().unwrap().pop().unwrap();
    assert_eq!(
        (line.at, line.action.as_str(), line.subject.as_str()),
        (102, "rollout.pause", "rol_a")
    );
}

pub(crate) fn task(id: &str) -> TaskRecord {
    TaskRecord {
        id: id.to_owned(),
        task_id: format!("signed-{id}"),
        task_type: "file".into(),
        envelope: "{}".into(),
        not_after: 10_000,
        agents: None,
        selector: Some(Labels::from([("role".to_owned(), "web".to_owned())])),
        created_at: 100,
        cancelled_at: None,
    }
}

pub(crate) fn task_result(task: &str, agent: &str, status: TaskStatus) -> TaskResultRecord {
    TaskResultRecord {
        task: task.to_owned(),
        agent: agent.to_owned(),
        status,
        reason: None,
        exit_code: None,
        output: Some("ok\n".into()),
        started: Some("2026-11-30T04:00:00Z".into()),
        finished: None,
        reported_at: 200,
    }
}

pub(crate) fn tasks_are_recorded_once_and_results_upserted(make: MakeStore<'_>) {
    let store = make();
    assert!(store.tasks().unwrap().is_empty());
    assert!(store.task_results(None).unwrap().is_empty());
    let (a, b) = (task("00000000000000aa"), task("00000000000000ab"));
    store.insert_task(&b).unwrap();
    store.insert_task(&a).unwrap();
    assert!(matches!(
        store.insert_task(&a),
        Err(StoreError::Exists { what: "task", .. })
    ));
    assert_eq!(store.tasks().unwrap(), vec![a.clone(), b.clone()]);
    let cancelled = TaskRecord {
        cancelled_at: Some(300),
        ..a.clone()
    };
    store.put_task(&cancelled, 300, "task.cancel").unwrap();
    assert_eq!(store.tasks().unwrap()[0], cancelled);
    assert!(matches!(
        store.put_task(&task("00000000000000ff"), 300, "task.cancel"),
        Err(StoreError::NotFound { what: "task", .. })
    ));

    let running = task_result(&a.id, "agt_a", TaskStatus::Running);
    let other = task_result(&b.id, "agt_a", TaskStatus::Refused);
    store
        .put_task_results(&[running.clone(), other.clone()])
        .unwrap();
    let done = TaskResultRecord {
        status: TaskStatus::Succeeded,
        exit_code: Some(0),
        finished: Some("2026-11-30T04:00:09Z".into()),
        ..running
    };
    let second = task_result(&a.id, "agt_b", TaskStatus::Unknown("paused".into()));
    store
        .put_task_results(&[done.clone(), second.clone()])
        .unwrap();
    // The same report again changes nothing.
    store.put_task_results(std::slice::from_ref(&done)).unwrap();
    store.put_task_results(&[]).unwrap();
    assert_eq!(
        store.task_results(Some(&a.id)).unwrap(),
        vec![done.clone(), second.clone()]
    );
    assert_eq!(
        store.task_results(Some(&b.id)).unwrap(),
        vec![other.clone()]
    );
    assert!(
        store
            .task_results(Some("00000000000000ff"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.task_results(None).unwrap(), vec![done, second, other]);
    let actions: Vec<String> = store
        .audit_log()
        .unwrap()
        .into_iter()
        .map(|l| l.action)
        .filter(|a| a.starts_with("task."))
        .collect();
    assert_eq!(
        actions,
        [
            "task.create",
            "task.create",
            "task.cancel",
            "task.result",
            "task.result",
            "task.result",
            "task.result",
            "task.result"
        ]
    );
}

fn admin_token(name: &str, role: &str) -> AdminTokenRecord {
    AdminTokenRecord {
        name: name.to_owned(),
        role: role.to_owned(),
        secret_sha256: "cd".repeat(32),
        created_at: 100,
        expires_at: Some(1000),
        revoked_at: None,
    }
}

pub(crate) fn admin_tokens_are_recorded_and_revoked_with_audit_lines(make: MakeStore<'_>) {
    let store = make();
    assert!(
        store.admin_tokens().unwrap().is_empty(),
        "none in a new store"
    );
    let ci = admin_token("ci", "operate");
    store.insert_admin_token(&ci).unwrap();
    store
        .insert_admin_token(&admin_token("a-viewer", "read"))
        .unwrap();
    assert!(matches!(
        store.insert_admin_token(&admin_token("ci", "admin")),
        Err(StoreError::Exists { .. })
    ));
    let names: Vec<String> = store
        .admin_tokens()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a-viewer", "ci"], "by name");
    let revoked = store
        .update_admin_token("ci", 200, "admin_token.revoke", &mut |t| {
            t.revoked_at = Some(200);
            Ok(true)
        })
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(200));
    let lines = store.audit_log().unwrap();
    let actions: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l.action.as_str(), l.subject.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("admin_token.create", "ci"),
            ("admin_token.create", "a-viewer"),
            ("admin_token.revoke", "ci")
        ]
    );
    // A refused change writes nothing, an unchanged one no line.
    let refused = store.update_admin_token("ci", 300, "admin_token.revoke", &mut |_| {
        Err(Refusal::conflict("no"))
    });
    assert!(matches!(refused, Err(StoreError::Aborted(_))));
    let same = store
        .update_admin_token("ci", 300, "admin_token.revoke", &mut |_| Ok(false))
        .unwrap();
    assert_eq!(same, revoked);
    assert!(matches!(
        store.update_admin_token("nobody", 300, "x", &mut |_| Ok(true)),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.audit_log().unwrap().len(), 3);
    assert_eq!(store.admin_tokens().unwrap()[1], revoked);
}

pub(crate) fn audit_lines_carry_who_and_read_in_pages(make: MakeStore<'_>) {
    use crate::audit::{self, Actor, Outcome};
    let store = make();
    let admin = Actor::new("ci", std::net::IpAddr::from([10, 1, 2, 3]));
    audit::acting_as(&admin, || store.set_config("global", "{}", "h1", 100)).unwrap();
    for i in 0..5 {
        let line = audit::unchanged(
            200 + i,
            &admin,
            Outcome::Refused,
            "agent.revoke",
            "agt_x",
            "403",
        );
        store.append_audit(&line).unwrap();
    }
    store.set_config("global", "{}", "h2", 300).unwrap();
    let all = store.audit_page(None, 100, &|_| true).unwrap();
    assert_eq!(all.len(), 7);
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    let first = &all[0].1;
    assert_eq!(
        (
            first.actor.as_deref(),
            first.source.as_deref(),
            first.outcome.as_deref()
        ),
        (Some("ci"), Some("10.1.2.3"), None)
    );
    assert_eq!(all[1].1.outcome.as_deref(), Some("refused"));
    assert_eq!(
        all[6].1.actor.as_deref(),
        Some(audit::SERVER),
        "no actor: the server"
    );
    // Pages: after a sequence number, at most `limit`, selected.
    let page = store.audit_page(Some(seqs[1]), 2, &|_| true).unwrap();
    assert_eq!(page.iter().map(|(s, _)| *s).collect::<Vec<_>>(), seqs[2..4]);
    let refused = store
        .audit_page(None, 100, &|l| l.outcome.as_deref() == Some("refused"))
        .unwrap();
    assert_eq!(refused.len(), 5);
    assert!(
        store
            .audit_page(Some(seqs[6]), 10, &|_| true)
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .audit_page(Some(u64::MAX), 10, &|_| true)
            .unwrap()
            .is_empty()
    );
}

pub(crate) fn a_snapshot_restores_into_an_equal_store(make: MakeStore<'_>) {
    let store = make();
    store.insert_token(&token("abcdef", 2)).unwrap();
    enroll(store.as_ref(), "abcdef", "agt_a", "01").unwrap();
    store
        .insert_admin_token(&admin_token("ci", "read"))
        .unwrap();
    store.set_config("global", "{}", "h1", 100).unwrap();
    store
        .save_heartbeats(&[(
            "agt_a".to_owned(),
            HeartbeatState {
                seq: 9,
                ..Default::default()
            },
        )])
        .unwrap();
    let mut rows = Vec::new();
    store
        .snapshot(&mut |table, key, value| {
            rows.push((table.to_owned(), key.to_owned(), value.to_vec()));
            Ok(())
        })
        .unwrap();
    let tables: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for t in &tables {
        assert!(
            super::SNAPSHOT_TABLES.contains(t),
            "{t} is a snapshot table"
        );
    }
    for t in [
        "meta",
        "agents",
        "heartbeats",
        "tokens",
        "certs",
        "enrollments",
        "configs",
        "admin_tokens",
        "audit",
    ] {
        assert!(tables.contains(t), "{t} in {tables:?}");
    }
    let copy = make();
    copy.restore_rows(&rows).unwrap();
    let mut again = Vec::new();
    copy.snapshot(&mut |table, key, value| {
        again.push((table.to_owned(), key.to_owned(), value.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(again, rows, "the copy holds the same rows");
    assert_eq!(copy.admin_tokens().unwrap(), store.admin_tokens().unwrap());
    assert_eq!(copy.audit_log().unwrap(), store.audit_log().unwrap());
    let mut loaded = Vec::new();
    copy.load_agents(&mut |a, hb| loaded.push((a.id, hb.seq)))
        .unwrap();
    assert_eq!(loaded, [("agt_a".to_owned(), 9)]);
    // A row of a table the backend does not know is refused.
    let bad = make();
    assert!(
        bad.restore_rows(&[("nope".into(), "k".into(), b"{}".to_vec())])
            .is_err()
    );
}

/// A reader that gives `bytes` and then fails, as a broken upload would.
struct FailingAfter<'a>(&'a [u8]);

impl std::io::Read for FailingAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Err(std::io::Error::other("the upload broke off"));
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

pub(crate) fn blobs_are_stored_whole_once_and_copied_back(make: MakeStore<'_>) {
    let store = make();
    // Larger than one PostgreSQL chunk, and not a multiple of it.
    let bytes: Vec<u8> = (0..(2 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sha256 = stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes));
    let size = bytes.len() as u64;
    let mut out = Vec::new();
    assert!(!store.copy_blob(&sha256, &mut out).unwrap());
    assert!(out.is_empty());
    assert!(store.blobs().unwrap().is_empty());

    // Wrong bytes, too many bytes, too few, or a reader that fails: refused,
    // nothing stored.
    let other = vec![7u8; bytes.len()];
    let longer = [bytes.as_slice(), b"x"].concat();
    for (what, data) in [
        ("other bytes", other.as_slice()),
        ("a byte more", longer.as_slice()),
        ("a byte less", &bytes[..bytes.len() - 1]),
    ] {
        let refused = store.put_blob(&sha256, size, &mut &data[..]);
        assert!(
            matches!(refused, Err(StoreError::Aborted(_))),
            "{what}: {refused:?}"
        );
    }
    let broken = store.put_blob(&sha256, size, &mut FailingAfter(&bytes[..3 << 19]));
    assert!(broken.is_err(), "{broken:?}");
    assert!(!store.copy_blob(&sha256, &mut out).unwrap());
    assert!(store.blobs().unwrap().is_empty());
    assert!(matches!(
        store.put_blob("../../etc/passwd", 0, &mut &b""[..]),
        Err(StoreError::Aborted(_))
    ));

    store.put_blob(&sha256, size, &mut &bytes[..]).unwrap();
    assert!(store.copy_blob(&sha256, &mut out).unwrap());
    assert!(out == bytes, "the blob comes back as stored");
    assert_eq!(store.blobs().unwrap(), [(sha256.clone(), size)]);
    // Stored again: kept, and the data is not even read.
    store
        .put_blob(&sha256, size, &mut FailingAfter(b""))
        .unwrap();

    // An empty blob is a blob too.
    let empty = stella_proto::hash::hex(&stella_proto::hash::sha256(b""));
    store.put_blob(&empty, 0, &mut &b""[..]).unwrap();
    let mut none = Vec::new();
    assert!(store.copy_blob(&empty, &mut none).unwrap());
    assert!(none.is_empty());
    let mut listed = store.blobs().unwrap();
    listed.sort();
    let mut expected = vec![(sha256, size), (empty, 0)];
    expected.sort();
    assert_eq!(listed, expected);
}
