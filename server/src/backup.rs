//! The backup file: a version line, then the store's rows (from one read
//! transaction) and the data dir's files, each length-prefixed, then the
//! SHA-256 of everything before it. Writing one, and checking and reading
//! one back for `restore`. Pure: no files, no store.
//!
//! ```text
//! stella-backup 1\n
//! row <name length> <value length>\n<table>/<key><value>\n      (any number)
//! file <name length> <value length>\n<path><bytes>\n            (any number)
//! sha256 <64 hex digits>\n
//! ```

use stella_proto::hash::{hex, sha256};

use crate::store::SNAPSHOT_TABLES;

/// The first line of every backup of this format.
const MAGIC: &str = "stella-backup ";
const VERSION: &str = "1";
/// `sha256 ` + 64 hex digits + `\n`.
const TRAILER_LEN: usize = 7 + 64 + 1;

/// The data dir files a backup may carry (blobs besides).
pub(crate) const FILES: &[&str] = &[
    crate::ca::CA_CERT,
    crate::ca::SERVER_CERT,
    crate::ca::SERVER_KEY,
    crate::roles::ADMIN_TOKEN_FILE,
    crate::ca::CA_KEY,
];

/// Whether `name` is a file a backup may carry: one of [`FILES`] or a
/// release blob `blobs/sha256/<hex>`. Anything else (`../x`, `/etc/x`) is
/// refused on restore.
pub(crate) fn allowed_file(name: &str) -> bool {
    FILES.contains(&name)
        || name.strip_prefix("blobs/sha256/").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Whether a file holds a secret (written 0600 on restore).
pub(crate) fn is_secret(name: &str) -> bool {
    name.ends_with(".key") || name == crate::roles::ADMIN_TOKEN_FILE
}

/// Builds a backup in memory.
pub(crate) struct Writer {
    out: Vec<u8>,
    pub(crate) rows: u64,
    pub(crate) files: u64,
}

impl Writer {
    pub(crate) fn new() -> Self {
        Self {
            out: format!("{MAGIC}{VERSION}\n").into_bytes(),
            rows: 0,
            files: 0,
        }
    }

    fn entry(&mut self, kind: &str, name: &str, value: &[u8]) {
        self.out
            .extend_from_slice(format!("{kind} {} {}\n", name.len(), value.len()).as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(value);
        self.out.push(b'\n');
    }

    pub(crate) fn row(&mut self, table: &str, key: &str, value: &[u8]) {
        self.rows += 1;
        self.entry("row", &format!("{table}/{key}"), value);
    }

    pub(crate) fn file(&mut self, name: &str, bytes: &[u8]) {
        self.files += 1;
        self.entry("file", name, bytes);
    }

    /// The finished backup, with its checksum.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let sum = hex(&sha256(&self.out));
        self.out
            .extend_from_slice(format!("sha256 {sum}\n").as_bytes());
        self.out
    }
}

/// What a backup holds.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    /// (table, key, value), as `Store::snapshot` gave them.
    pub(crate) rows: Vec<(String, String, Vec<u8>)>,
    /// (path in the data dir, bytes).
    pub(crate) files: Vec<(String, Vec<u8>)>,
}

impl Contents {
    pub(crate) fn file(&self, name: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    }

    pub(crate) fn rows_of(&self, table: &str) -> usize {
        self.rows.iter().filter(|(t, _, _)| t == table).count()
    }
}

/// Checks a backup (version, checksum, every entry) and reads it. The
/// message names what is wrong.
pub(crate) fn read(bytes: &[u8]) -> Result<Contents, String> {
    let first_line = bytes
        .iter()
        .position(|&b| b == b'\n')
        .and_then(|end| std::str::from_utf8(&bytes[..end]).ok());
    let version = first_line
        .and_then(|l| l.strip_prefix(MAGIC))
        .ok_or("not a Stella backup (it does not start with \"stella-backup\")")?;
    if version != VERSION {
        return Err(format!(
            "backup format version {version:?}; this server reads version {VERSION}"
        ));
    }
    if bytes.len() < MAGIC.len() + VERSION.len() + 1 + TRAILER_LEN {
        return Err("the backup is truncated (no checksum)".into());
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let want = std::str::from_utf8(trailer)
        .ok()
        .and_then(|t| t.strip_prefix("sha256 "))
        .and_then(|t| t.strip_suffix('\n'))
        .ok_or("the backup is truncated or damaged (no checksum line at its end)")?;
    let got = hex(&sha256(body));
    if got != want {
        return Err(format!(
            "the backup's checksum does not match (sha256 {got}, the file says {want}): it is damaged or truncated"
        ));
    }
    let mut contents = Contents::default();
    let mut rest = &body[MAGIC.len() + VERSION.len() + 1..];
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a backup entry has no header line")?;
        let header =
            std::str::from_utf8(&rest[..end]).map_err(|_| "a backup entry header is not text")?;
        let mut parts = header.split(' ');
        let (Some(kind), Some(name_len), Some(value_len), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("bad backup entry header {header:?}"));
        };
        let (Ok(name_len), Ok(value_len)) = (name_len.parse::<usize>(), value_len.parse::<usize>())
        else {
            return Err(format!("bad backup entry header {header:?}"));
        };
        rest = &rest[end + 1..];
        let total = name_len
            .checked_add(value_len)
            .and_then(|n| n.checked_add(1))
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| format!("backup entry {header:?} runs past the end"))?;
        if rest[total - 1] != b'\n' {
            return Err(format!(
                "backup entry {header:?} does not end with a newline"
            ));
        }
        let name = std::str::from_utf8(&rest[..name_len])
            .map_err(|_| format!("backup entry {header:?} has a name that is not text"))?;
        let value = rest[name_len..name_len + value_len].to_vec();
        match kind {
            "row" => {
                let (table, key) = name
                    .split_once('/')
                    .filter(|(t, _)| SNAPSHOT_TABLES.contains(t))
                    .ok_or_else(|| format!("backup row {name:?} is not of a known table"))?;
                contents
                    .rows
                    .push((table.to_owned(), key.to_owned(), value));
            }
            "file" if allowed_file(name) => contents.files.push((name.to_owned(), value)),
            "file" => return Err(format!("backup file {name:?} is not a data dir file")),
            other => return Err(format!("unknown backup entry kind {other:?}")),
        }
        rest = &rest[total..];
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.row("meta", "schema", b"1");
        w.row("agents", "agt_a", b"{\"id\":\"agt_a\"}\n");
        w.row("audit", "0", b"{}");
        w.file("ca.pem", b"PEM\n");
        w.file(&format!("blobs/sha256/{}", "ab".repeat(32)), b"\0\x01");
        w.finish()
    }

    #[test]
    fn a_backup_reads_back_as_written() {
        let c = read(&sample()).unwrap();
        assert_eq!(c.rows.len(), 3);
        assert_eq!(
            c.rows[1],
            (
                "agents".into(),
                "agt_a".into(),
                b"{\"id\":\"agt_a\"}\n".to_vec()
            )
        );
        assert_eq!(c.file("ca.pem"), Some(&b"PEM\n"[..]));
        assert_eq!(c.rows_of("audit"), 1);
        assert_eq!(c.files.len(), 2);
    }

    #[test]
    fn damage_of_any_kind_is_refused_by_name() {
        let good = sample();
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        let mut wrong_version = good.clone();
        wrong_version[14] = b'9';
        for (bytes, needle) in [
            (b"hello".to_vec(), "not a Stella backup"),
            (wrong_version, "version \"9\""),
            (good[..good.len() - 10].to_vec(), "damaged"),
            (flipped, "checksum does not match"),
            (good[..40].to_vec(), "truncated"),
        ] {
            let e = read(&bytes).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut w = Writer::new();
        w.file("../../etc/passwd", b"x");
        assert!(
            read(&w.finish())
                .unwrap_err()
                .contains("not a data dir file")
        );
        let mut w = Writer::new();
        w.row("nope", "k", b"x");
        assert!(read(&w.finish()).unwrap_err().contains("known table"));
        assert!(allowed_file("ca.key") && is_secret("ca.key") && is_secret("admin.token"));
        assert!(!allowed_file("blobs/sha256/AB") && !allowed_file("server.redb"));
    }
}
