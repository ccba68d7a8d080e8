//! Writes the CRDs generated from the Rust types.
//!
//! `crdgen [DIR...]` writes one YAML file per CRD into each DIR (default: `crds` and
//! `charts/leasehold-crds/files`). `crdgen --stdout` prints them instead.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "crdgen: write the leasehold CRDs generated from the Rust API types\n\n\
             usage: crdgen [--stdout] [DIR...]\n\n\
             Without DIR, writes into ./crds and ./charts/leasehold-crds/files, and the API\n\
             reference into ./docs/api-reference.md (run it from the repository root). --stdout prints all CRDs as one YAML stream."
        );
        return ExitCode::SUCCESS;
    }
    let stdout = args.iter().any(|a| a == "--stdout");
    let mut dirs: Vec<PathBuf> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        dirs = vec!["crds".into(), "charts/leasehold-crds/files".into()];
    }
    if !stdout {
        let path = std::path::Path::new("docs/api-reference.md");
        if let Err(e) = std::fs::create_dir_all("docs")
            .and_then(|()| std::fs::write(path, leasehold_api::reference::markdown()))
        {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    for (file, crd) in leasehold_api::crds() {
        let yaml = match leasehold_api::crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: cannot serialise {file}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if stdout {
            print!("---\n{yaml}");
            continue;
        }
        for dir in &dirs {
            let path = dir.join(&file);
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
