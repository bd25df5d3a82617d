//! What this host is and can do: platform, name, and capabilities (container
//! runtimes, systemd), detected cheaply from the filesystem.

use std::path::Path;

use stella_proto::api::Platform;

/// The agent's version: `STELLA_VERSION` at build time, else the crate's.
pub(crate) const VERSION: &str = match option_env!("STELLA_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The target triple this binary was built for.
pub(crate) const TARGET: &str = env!("STELLA_TARGET");

/// Hex SHA-256 of a file, streamed in 16 KiB chunks.
pub(crate) fn file_sha256(path: &Path) -> std::io::Result<String> {
    file_sha256_capped(path, u64::MAX).map(|(digest, _)| digest)
}

/// Hex SHA-256 and size of a file, refusing one larger than `limit` bytes.
pub(crate) fn file_sha256_capped(path: &Path, limit: u64) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = [0u8; 16 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > limit {
            return Err(std::io::Error::other("larger than the limit"));
        }
        ctx.update(&buf[..n]);
    }
    Ok((stella_proto::hash::hex(ctx.finish().as_ref()), size))
}

/// OS, architecture and target of this build.
pub(crate) fn platform() -> Platform {
    Platform {
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        target: TARGET.to_owned(),
    }
}

/// The host name, for agents enrolled without `--name`.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unnamed".to_owned())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Capabilities of this host, sorted.
pub(crate) fn capabilities() -> Vec<String> {
    let mut caps = Vec::new();
    if on_path("docker") || Path::new("/var/run/docker.sock").exists() {
        caps.push("docker");
    }
    if on_path("podman") {
        caps.push("podman");
    }
    let compose_plugin = [
        "/usr/libexec/docker/cli-plugins/docker-compose",
        "/usr/lib/docker/cli-plugins/docker-compose",
        "/usr/local/lib/docker/cli-plugins/docker-compose",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if on_path("docker-compose") || on_path("podman-compose") || compose_plugin {
        caps.push("compose");
    }
    if Path::new("/run/systemd/system").is_dir() {
        caps.push("systemd");
    }
    caps.sort_unstable();
    caps.into_iter().map(str::to_owned).collect()
}
