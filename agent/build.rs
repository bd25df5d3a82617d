//! Records the target triple the agent is compiled for (its update channel).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=STELLA_TARGET={target}");
    println!("cargo:rerun-if-env-changed=STELLA_VERSION");
}
