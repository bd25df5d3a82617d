//! The PostgreSQL backend against a real PostgreSQL (started by the tests
//! crate's harness): the store conformance suite, migrations under the lock,
//! one token use across two "servers", an outage and the recovery, start-up
//! failures, and TLS verified against a CA file. Under CI=true a missing
//! PostgreSQL fails these tests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use stella_tests::postgres::Postgres;

use super::*;
use crate::refusal::Refusal;
use crate::store::conformance::{self, MakeStore, store_conformance};
use crate::store::{ChangeKind, NewEnrollment, Wake};

/// A new empty database on `pg`, with a unique name.
fn database(pg: &Postgres, label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    pg.database(&format!("{label}_{}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

#[test]
fn the_store_conformance_suite_passes_on_postgresql() {
    let Some(pg) = Postgres::start("the_store_conformance_suite_passes_on_postgresql") else {
        return;
    };
    let make = || -> Box<dyn Store> {
        Box::new(PgStore::create(&database(&pg, "conformance"), conformance::ADMIN_SHA256).unwrap())
    };
    let cases = store_conformance!(@cases);
    for (name, case) in cases {
        eprintln!("conformance on PostgreSQL: {name}");
        let make: MakeStore<'_> = &make;
        case(make);
    }
}

#[test]
fn migrations_schema_outages_and_start_up_failures() {
    let Some(mut pg) = Postgres::start("migrations_schema_outages_and_start_up_failures") else {
        return;
    };

    // Servers starting together migrate once, under the lock.
    let url = database(&pg, "race");
    let opened: Vec<Result<PgStore, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| PgStore::open_uninitialized(&url)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for store in &opened {
        assert!(store.is_ok(), "{:?}", store.as_ref().err());
    }
    let db = url.rsplit('/').next().unwrap();
    assert_eq!(
        pg.sql(
            db,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM stella_schema"
        ),
        schema::MIGRATIONS
            .iter()
            .map(|(v, _)| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    // `serve` refuses a database `init` did not prepare; `init` twice is
    // refused.
    assert!(matches!(
        PgStore::open(&url),
        Err(StoreError::NotInitialized { .. })
    ));
    PgStore::create(&url, "ab").unwrap();
    assert!(matches!(
        PgStore::create(&url, "cd"),
        Err(StoreError::Exists { .. })
    ));
    assert_eq!(
        PgStore::open(&url).unwrap().admin_token_sha256().unwrap(),
        "ab"
    );

    // A schema newer than this server knows is refused, clearly.
    pg.sql(db, "INSERT INTO stella_schema (version) VALUES (999)");
    let newer = PgStore::open(&url)
        .err()
        .expect("a newer schema is refused");
    assert!(matches!(newer, StoreError::SchemaTooNew { found: 999, .. }));
    assert!(
        newer.to_string().contains("newer than this server knows"),
        "{newer}"
    );
    pg.sql(db, "DELETE FROM stella_schema WHERE version = 999");

    // One token, one use, across two servers (two pools) enrolling at once.
    let a = PgStore::open(&url).unwrap();
    let b = PgStore::open(&url).unwrap();
    a.insert_token(&conformance::token("shared", 1)).unwrap();
    let outcomes: Vec<Result<(), StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = if i % 2 == 0 { &a } else { &b };
                s.spawn(move || {
                    store.enroll("shared", &format!("key{i}"), &mut |state| {
                        let mut token = state.token.clone().expect("the token");
                        if token.uses_left == 0 {
                            return Err(Refusal::unauthorized("token used up"));
                        }
                        token.uses_left -= 1;
                        let id = format!("agt_{i}");
                        let serial = format!("{i:02}");
                        Ok(Some(NewEnrollment {
                            token,
                            agent: conformance::agent(&id, &serial),
                            cert: conformance::cert(&id, &serial),
                            at: 200,
                        }))
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let enrolled = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(enrolled, 1, "{outcomes:?}");
    let mut agents = 0;
    a.load_agents(&mut |_, _| agents += 1).unwrap();
    assert_eq!(agents, 1);
    assert_eq!(b.token("shared").unwrap().unwrap().uses_left, 0);

    // PostgreSQL stops: calls fail as unavailable (quickly, no hang), the
    // store says so, and it recovers by itself when PostgreSQL is back.
    pg.stop();
    let started = Instant::now();
    let failed = a.insert_token(&conformance::token("during", 1));
    assert!(
        matches!(failed, Err(StoreError::Unavailable { .. })),
        "{failed:?}"
    );
    assert!(
        started.elapsed() <= pool::QUERY_TIMEOUT * 2,
        "the failure took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        a.agent("agt_0"),
        Err(StoreError::Unavailable { .. })
    ));
    assert!(a.health().unwritable.is_some());
    assert!(a.health().errors >= 2);
    assert!(a.probe_write(1).is_err());
    pg.start_again();
    a.probe_write(2).unwrap();
    assert!(a.health().unwritable.is_none());
    a.insert_token(&conformance::token("after", 1)).unwrap();
    assert!(a.token("during").unwrap().is_none(), "refused, not written");
    assert!(b.token("after").unwrap().is_some());

    // Start-up failures: one line naming the database, not its password.
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("postgres://stella:secret@127.0.0.1:{port}/x")
    };
    let bad_password = url.replace(stella_tests::postgres::PASSWORD, "wrong");
    for (url, expect) in [
        (refused.as_str(), "cannot connect"),
        (bad_password.as_str(), "password authentication failed"),
        (
            "postgres://stella@127.0.0.1:notaport/x",
            "bad PostgreSQL URL",
        ),
        (
            "postgres://stella@127.0.0.1/x?sslmode=require",
            "needs sslrootcert",
        ),
    ] {
        let e = PgStore::open(url).err().expect("refused");
        let line = e.to_string();
        assert!(line.contains(expect), "{url}: {line}");
        assert!(!line.contains('\n'), "{line}");
        assert!(
            !line.contains("secret") && !line.contains("wrong"),
            "{line}"
        );
    }
}

/// A CA (its PEM written as `ca.pem` in `dir`) and, unless `leaf` is
/// false, a certificate and key it signed for localhost and 127.0.0.1.
fn test_pki(dir: &std::path::Path, leaf: bool) -> Option<(String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    if !leaf {
        return None;
    }
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.is_ca = IsCa::ExplicitNoCa;
    let cert = params.signed_by(&key, &issuer).unwrap();
    Some((cert.pem(), key.serialize_pem()))
}

#[test]
fn tls_is_verified_against_the_ca_file() {
    let dir = stella_tests::TempDir::new("pg-tls");
    let (cert_pem, key_pem) = test_pki(dir.path(), true).unwrap();
    // PostgreSQL reads its key as its own user, from a place it can reach,
    // private.
    let cert = std::env::temp_dir().join(format!("stella-pg-tls-{}.pem", std::process::id()));
    let key = std::env::temp_dir().join(format!("stella-pg-tls-{}.key", std::process::id()));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    stella_tests::postgres::hand_over(&key);
    let settings = [
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let started = Postgres::start_with("tls_is_verified_against_the_ca_file", &settings);
    let Some(pg) = started else {
        return;
    };
    let url = database(&pg, "tls");
    let ca = dir.join("ca.pem");
    let tls_url = format!("{url}?sslmode=require&sslrootcert={}", ca.display());
    PgStore::create(&tls_url, "ab").unwrap();
    let store = PgStore::open(&tls_url).unwrap();
    store.insert_token(&conformance::token("tls", 1)).unwrap();
    let db = url.rsplit('/').next().unwrap();
    let tls_connections: u32 = pg
        .sql(
            db,
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = '' AND datname = current_database()",
        )
        .parse()
        .unwrap();
    assert!(tls_connections >= 1, "the store's connection uses TLS");
    // Another CA: the certificate is not trusted.
    let other = stella_tests::TempDir::new("pg-tls-other");
    test_pki(other.path(), false);
    let wrong = format!(
        "{url}?sslmode=require&sslrootcert={}",
        other.join("ca.pem").display()
    );
    let e = PgStore::open(&wrong)
        .err()
        .expect("an untrusted certificate");
    assert!(e.to_string().contains("cannot connect"), "{e}");
    drop(pg);
    let _ = std::fs::remove_file(&cert);
    let _ = std::fs::remove_file(&key);
}

/// Heartbeat soft state written in batches: how many per second one
/// server writes (not a budget check; run with `--ignored --nocapture`).
#[test]
#[ignore = "a measurement, run by hand"]
fn heartbeat_batches_per_second() {
    // Durable as in production (the harness turns fsync off otherwise).
    let durable = ["fsync=on", "full_page_writes=on"];
    let Some(pg) = Postgres::start_with("heartbeat_batches_per_second", &durable) else {
        return;
    };
    let store = PgStore::create(&database(&pg, "bench"), "ab").unwrap();
    let batch: Vec<(String, HeartbeatState)> = (0..20_000)
        .map(|i| {
            (
                format!("agt_{i:06}"),
                HeartbeatState {
                    last_heartbeat_ms: 1_700_000_000_000 + i,
                    seq: i,
                    version: "1.0.0".into(),
                    ..<HeartbeatState as Default>::default()
                },
            )
        })
        .collect();
    store.save_heartbeats(&batch).unwrap();
    let rounds = 10;
    let started = Instant::now();
    for _ in 0..rounds {
        store.save_heartbeats(&batch).unwrap();
    }
    let per_second = (batch.len() * rounds) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "PostgreSQL: {per_second:.0} heartbeat states/s in batches of {}",
        batch.len()
    );
}

#[test]
fn migrate_copies_a_redb_store_whole_and_refuses_a_used_target() {
    let Some(pg) = Postgres::start("migrate_copies_a_redb_store_whole_and_refuses_a_used_target")
    else {
        return;
    };
    let dir = stella_tests::TempDir::new("pg-migrate");
    let redb = crate::store::RedbStore::create(&dir.join("server.redb"), "ab12").unwrap();
    redb.insert_token(&conformance::token("abcdef", 3)).unwrap();
    conformance::enroll(&redb, "abcdef", "agt_a", "01").unwrap();
    conformance::enroll(&redb, "abcdef", "agt_b", "02").unwrap();
    redb.save_heartbeats(&[(
        "agt_a".into(),
        HeartbeatState {
            seq: 7,
            ..<HeartbeatState as Default>::default()
        },
    )])
    .unwrap();
    redb.set_config("global", "{}", "h1", 100).unwrap();
    redb.set_config("global", r#"{"a":1}"#, "h2", 101).unwrap();
    redb.put_rollout(
        &conformance::rollout("rol_a", "running"),
        None,
        102,
        "rollout.start",
        "",
    )
    .unwrap();
    let export = redb.export().unwrap();
    let audit_before = redb.audit_log().unwrap();

    let url = database(&pg, "migrate");
    let store = PgStore::open_uninitialized(&url).unwrap();
    let counts = store.import(&export).unwrap();
    assert!(counts.contains(&("agents", 2)), "{counts:?}");
    let store = PgStore::open(&url).unwrap();
    assert_eq!(store.admin_token_sha256().unwrap(), "ab12");
    let mut seqs = Vec::new();
    store
        .load_agents(&mut |a, hb| seqs.push((a.id, hb.seq)))
        .unwrap();
    assert_eq!(seqs, [("agt_a".to_owned(), 7), ("agt_b".to_owned(), 0)]);
    assert_eq!(store.token("abcdef").unwrap().unwrap().uses_left, 1);
    assert_eq!(store.cert("02").unwrap().unwrap().agent_id, "agt_b");
    let config = store.configs().unwrap().pop().unwrap();
    assert_eq!((config.version, config.hash.as_str()), (2, "h2"));
    assert_eq!(store.rollouts().unwrap()[0].id, "rol_a");
    let audit: Vec<(String, String)> = store
        .audit_log()
        .unwrap()
        .into_iter()
        .map(|l| (l.action, l.subject))
        .collect();
    let expected: Vec<(String, String)> = audit_before
        .into_iter()
        .map(|l| (l.action, l.subject))
        .collect();
    assert_eq!(audit, expected, "the audit log, in order");
    // The enrollment markers came along: a retry sees the earlier answer.
    let mut prior = None;
    store
        .enroll("abcdef", "key", &mut |state| {
            prior = state.prior.as_ref().map(|p| p.agent.id.clone());
            Ok(None)
        })
        .unwrap();
    assert!(prior.is_some());
    // The next config version continues from the copied one.
    assert_eq!(
        store.set_config("global", "{}", "h3", 103).unwrap().version,
        3
    );
    // A target that holds a store is refused, and left as it was.
    assert!(matches!(
        store.import(&export),
        Err(StoreError::Exists { .. })
    ));
    assert_eq!(store.configs().unwrap()[0].version, 3);
}

#[test]
fn urls_are_shown_without_their_password() {
    assert_eq!(
        redact("postgres://stella:secret@db:5432/fleet?sslmode=require"),
        "postgres://stella@db:5432/fleet?sslmode=require"
    );
    assert_eq!(
        redact("postgresql://stella@db/fleet?password=secret&sslmode=disable"),
        "postgresql://stella@db/fleet?sslmode=disable"
    );
    assert_eq!(redact("postgres://db/fleet"), "postgres://db/fleet");
}

#[test]
fn servers_sharing_a_database_see_each_others_changes_heartbeats_and_one_leader() {
    let test = "servers_sharing_a_database_see_each_others_changes_heartbeats_and_one_leader";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let url = database(&pg, "cluster");
    let one = PgStore::create(&url, "ab").unwrap();
    let two = PgStore::open(&url).unwrap();
    let (c1, c2) = (one.cluster().unwrap(), two.cluster().unwrap());
    assert_ne!(c1.node(), c2.node());
    let start = c2.last_change().unwrap();

    // The second server listens; a change through the first wakes it, and
    // the events name what changed, with who wrote them.
    assert_ne!(c2.wait_for_change(Duration::from_millis(50)), Wake::Resync);
    one.set_config("global", "{}", "h1", 1).unwrap();
    assert_eq!(c2.wait_for_change(Duration::from_secs(10)), Wake::Notified);
    let (events, oldest) = c2.changes_since(start, 100).unwrap();
    assert!(oldest <= start + 1, "{oldest}");
    let seen: Vec<(Option<ChangeKind>, &str, bool)> = events
        .iter()
        .map(|(e, mine)| (e.kind, e.key.as_str(), *mine))
        .collect();
    assert_eq!(seen, [(Some(ChangeKind::Config), "global", false)]);
    let (events, _) = c1.changes_since(start, 100).unwrap();
    assert!(events[0].1, "the first server wrote it");
    // A change rolled back publishes nothing.
    let refused = one.update_agents(&["agt_missing"], 1, "agent.deactivate", &mut |_| Ok(true));
    assert!(matches!(refused, Err(StoreError::NotFound { .. })));
    assert_eq!(c2.changes_since(start, 100).unwrap().0.len(), 1);
    // A failed registration reaches every server's brake.
    c1.record_failure(ChangeKind::RegistrationFailure, "192.0.2.7")
        .unwrap();
    let (events, _) = c2.changes_since(start, 100).unwrap();
    assert_eq!(events[1].0.kind, Some(ChangeKind::RegistrationFailure));
    assert_eq!(events[1].0.key, "192.0.2.7");

    // Heartbeat state the first saves is the second's feed, not its own.
    let state = HeartbeatState {
        last_heartbeat_ms: 42,
        seq: 7,
        ..<HeartbeatState as Default>::default()
    };
    one.save_heartbeats(&[("agt_1".to_owned(), state)]).unwrap();
    let (theirs, now) = c2.heartbeats_since(0).unwrap();
    assert_eq!(theirs.len(), 1);
    assert_eq!((theirs[0].0.as_str(), theirs[0].1.seq), ("agt_1", 7));
    assert!(now > 0);
    assert!(c1.heartbeats_since(0).unwrap().0.is_empty());
    assert!(c2.heartbeats_since(now + 60_000).unwrap().0.is_empty());

    // One leader at a time; a new term has a greater fencing token, and the
    // old leader's fenced writes are refused with nothing written.
    let ttl = Duration::from_secs(30);
    let first = c1
        .acquire_lease("leader", ttl)
        .unwrap()
        .expect("free lease");
    assert_eq!(c2.acquire_lease("leader", ttl).unwrap(), None);
    assert_eq!(c1.acquire_lease("leader", ttl).unwrap(), Some(first));
    crate::store::fenced("leader", first, || {
        one.set_config("global", "{}", "h2", 2).unwrap();
    });
    c1.release_lease("leader").unwrap();
    let second = c2.acquire_lease("leader", ttl).unwrap().expect("given up");
    assert!(second > first);
    let stale = crate::store::fenced("leader", first, || one.set_config("global", "{}", "h3", 3));
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    assert_eq!(two.configs().unwrap()[0].hash, "h2");
    crate::store::fenced("leader", second, || {
        two.set_config("global", "{}", "h4", 4).unwrap();
    });
    // An expired lease is free for another server.
    c2.acquire_lease("leader", Duration::from_millis(1))
        .unwrap();
    let taken = stella_tests::poll(Duration::from_secs(10), || {
        c1.acquire_lease("leader", ttl).unwrap()
    });
    assert!(taken.is_some_and(|t| t > second));
    // Pruning keeps what is young.
    assert_eq!(c1.prune_changes(Duration::from_secs(3600)).unwrap(), 0);
}

#[test]
fn two_servers_storing_one_blob_at_once_store_it_once() {
    let test = "two_servers_storing_one_blob_at_once_store_it_once";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let url = database(&pg, "blob_race");
    let a = PgStore::create(&url, "ab").unwrap();
    let b = PgStore::open(&url).unwrap();
    let bytes: Vec<u8> = (0..(5u32 << 20) + 3).map(|i| (i % 247) as u8).collect();
    let sha256 = stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes));
    let size = bytes.len() as u64;
    let outcomes: Vec<Result<(), StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let store = if i % 2 == 0 { &a } else { &b };
                let bytes = &bytes;
                let sha256 = &sha256;
                s.spawn(move || store.put_blob(sha256, size, &mut &bytes[..]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for outcome in &outcomes {
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    assert_eq!(b.blobs().unwrap(), [(sha256.clone(), size)]);
    let db = url.rsplit('/').next().unwrap();
    assert_eq!(
        pg.sql(
            db,
            &format!("SELECT count(*) FROM blob_chunks WHERE sha256 = '{sha256}'")
        ),
        "6",
        "5 MiB and 3 bytes: six chunks, once"
    );
    // Copied back whole by the other server, through a file as a cache fill
    // would.
    let mut copied = Vec::new();
    assert!(a.copy_blob(&sha256, &mut copied).unwrap());
    assert!(copied == bytes);
}

/// How fast a blob goes into PostgreSQL and back out (not a budget check;
/// run with `--ignored --nocapture`).
#[test]
#[ignore = "a measurement, run by hand"]
fn blob_store_and_copy_throughput() {
    let Some(pg) = Postgres::start("blob_store_and_copy_throughput") else {
        return;
    };
    let store = PgStore::create(&database(&pg, "blob_speed"), "ab").unwrap();
    let bytes: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let sha256 = stella_proto::hash::hex(&stella_proto::hash::sha256(&bytes));
    let started = Instant::now();
    store
        .put_blob(&sha256, bytes.len() as u64, &mut &bytes[..])
        .unwrap();
    let stored = started.elapsed();
    let started = Instant::now();
    let mut sink = std::io::sink();
    assert!(store.copy_blob(&sha256, &mut sink).unwrap());
    let copied = started.elapsed();
    let mib = (bytes.len() >> 20) as f64;
    eprintln!(
        "PostgreSQL blob of {mib} MiB: stored at {:.0} MiB/s, copied at {:.0} MiB/s",
        mib / stored.as_secs_f64(),
        mib / copied.as_secs_f64()
    );
}
