//! Writes every CRD into `deploy/crds/` (or the directory given), one file each.
//!
//! `cargo run -p k8s --bin crdgen [DIR]`; `k8s/tests/crds.rs` fails when the files differ from
//! what the types generate.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds")),
        PathBuf::from,
    );
    if let Err(error) = std::fs::create_dir_all(&dir) {
        eprintln!("error: cannot create {}: {error}", dir.display());
        return ExitCode::from(1);
    }
    for crd in k8s::crds() {
        let path = dir.join(k8s::file_name(&crd));
        let written = k8s::to_yaml(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        match written {
            Ok(()) => println!("wrote {}", path.display()),
            Err(error) => {
                eprintln!("error: {}: {error}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
