//! The benchmark report: runs every benchmark of `loadtests/` with its same-run baseline, keeps
//! each one's JSON, and writes a Markdown page with SVG plots (`loadtests/report/README.md`).
//!
//! cargo build --release -p mecha -p activator-sidecar -p loadtests
//! target/release/report [--quick] [--out loadtests/report] [--from DIR]
//!
//! `--quick` runs short rounds (a few minutes in all); `--from DIR` only redraws the report from
//! JSON kept in DIR by an earlier run. A benchmark that fails is named in the report and makes
//! the command exit 1 once the rest has run.

use std::path::{Path, PathBuf};
use std::process::Command;

use loadtests::results::{Machine, Results, load_average, read_json, write_json};

struct Args {
    quick: bool,
    out: PathBuf,
    from: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut args = Args {
        quick: false,
        out: root.join("report"),
        from: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().ok_or("--out needs a directory")?.into(),
            "--from" => args.from = Some(it.next().ok_or("--from needs a directory")?.into()),
            other => return Err(format!("unknown flag {other}; see the file's header")),
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    match run(&args) {
        Ok(results) if results.failures.is_empty() => {}
        Ok(results) => {
            for failure in &results.failures {
                eprintln!("error: {failure}");
            }
            std::process::exit(1);
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}

/// The JSON files a run keeps, one per benchmark, and the machine's.
const MACHINE: &str = "machine.json";
const GATEWAY: &str = "gateway-latency.json";
const PROXY: &str = "proxy-throughput.json";
const SCALE: &str = "scale-from-zero.json";
const BROKER: &str = "broker.json";
const TICK: &str = "autoscaler-tick.json";
const JETSTREAM: &str = "broker-jetstream.json";

fn run(args: &Args) -> Result<Results, String> {
    let results = match &args.from {
        Some(dir) => load(dir)?,
        None => measure(args)?,
    };
    let files = loadtests::report::write(&results, &args.out)?;
    for file in files {
        println!("wrote {}", file.display());
    }
    Ok(results)
}

/// A kept run: every file that is there (a benchmark that failed left none).
fn load(dir: &Path) -> Result<Results, String> {
    #[derive(serde::Deserialize)]
    struct Kept {
        machine: Machine,
        quick: bool,
    }
    let kept: Kept = read_json(&dir.join(MACHINE))?;
    let optional = |name: &str| dir.join(name).exists().then(|| dir.join(name));
    Ok(Results {
        machine: kept.machine,
        quick: kept.quick,
        gateway: optional(GATEWAY).map(|p| read_json(&p)).transpose()?,
        proxy: optional(PROXY).map(|p| read_json(&p)).transpose()?,
        scale: optional(SCALE).map(|p| read_json(&p)).transpose()?,
        broker: optional(BROKER).map(|p| read_json(&p)).transpose()?,
        autoscaler_tick: optional(TICK).map(|p| read_json(&p)).transpose()?,
        jetstream: optional(JETSTREAM).map(|p| read_json(&p)).transpose()?,
        failures: Vec::new(),
    })
}

fn measure(args: &Args) -> Result<Results, String> {
    let bin = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's directory: {e}"))?
        .parent()
        .ok_or("this program has no directory")?
        .to_path_buf();
    for needed in ["mecha", "activator-sidecar", "gateway-latency", "broker"] {
        if !bin.join(needed).is_file() {
            return Err(format!(
                "{} is missing: cargo build --release -p mecha -p activator-sidecar -p loadtests",
                bin.join(needed).display()
            ));
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let kept = args.out.join("results");
    let _ = std::fs::remove_dir_all(&kept);
    std::fs::create_dir_all(&kept).map_err(|e| format!("cannot create {}: {e}", kept.display()))?;
    let mut results = Results {
        machine: Machine::here(),
        quick: args.quick,
        ..Results::default()
    };
    let q = args.quick;
    let path = |name: &str| kept.join(name).display().to_string();
    let mecha = bin.join("mecha").display().to_string();
    let sidecar = bin.join("activator-sidecar").display().to_string();

    // Each benchmark in turn; a failure is recorded and the rest still run.
    let mut step = |name: &str, mut command: Command, file: &str| {
        println!("== {name}");
        match command.status() {
            Ok(status) if status.success() => true,
            Ok(status) => {
                results
                    .failures
                    .push(format!("{name} exited with {status}"));
                let _ = std::fs::remove_file(kept.join(file));
                false
            }
            Err(error) => {
                results
                    .failures
                    .push(format!("{name} did not start: {error}"));
                false
            }
        }
    };

    let mut proxy = Command::new("bash");
    proxy
        .arg(root.join("loadtests/proxy-throughput.sh"))
        .args(if q {
            ["2", "1,8,32,128", "1"]
        } else {
            ["6", "1,8,32,128", "3"]
        })
        .env("SIDECAR", &sidecar)
        .env("JSON", path(PROXY));
    step("proxy-throughput", proxy, PROXY);

    let mut gateway = Command::new(bin.join("gateway-latency"));
    gateway
        .args(["--mecha", &mecha, "--sidecar", &sidecar, "--rate", "1000"])
        .args(["--requests", if q { "1000" } else { "5000" }])
        .args(["--json", &path(GATEWAY)]);
    step("gateway-latency", gateway, GATEWAY);

    let mut scale = Command::new(bin.join("scale-from-zero"));
    scale
        .args(["--mecha", &mecha])
        .args(if q {
            ["--runs", "5", "--burst", "200", "--ramp", "4"]
        } else {
            ["--runs", "10", "--burst", "1000", "--ramp", "10"]
        })
        .args(["--json", &path(SCALE)]);
    step("scale-from-zero", scale, SCALE);

    let mut broker = Command::new(bin.join("broker"));
    broker
        .args(["--clients", "1,8,32,128", "--rate", "1000"])
        .args(if q {
            ["--seconds", "2", "--rounds", "1", "--backlog", "20000"]
        } else {
            ["--seconds", "5", "--rounds", "3", "--backlog", "100000"]
        })
        .args(["--json", &path(BROKER)]);
    step("broker", broker, BROKER);

    let mut tick = Command::new(bin.join("autoscaler-tick"));
    tick.args([
        "--revisions",
        "10000",
        "--passes",
        if q { "5" } else { "20" },
    ])
    .args(["--json", &path(TICK)]);
    step("autoscaler-tick", tick, TICK);

    // The standalone broker on JetStream, when its binary is built (it needs nats-server).
    if bin.join("eventing-broker").is_file() {
        let mut js = Command::new(bin.join("broker-jetstream"));
        js.args(["--clients", "32", "--rate", "1000"])
            .args(if q {
                ["--seconds", "2", "--rounds", "1"]
            } else {
                ["--seconds", "5", "--rounds", "3"]
            })
            .args(["--json", &path(JETSTREAM)]);
        step("broker-jetstream", js, JETSTREAM);
    } else {
        println!(
            "== broker-jetstream skipped: build it with cargo build --release -p eventing-broker"
        );
    }

    results.machine.load_after = load_average();
    let read = |name: &str| -> Option<PathBuf> { Some(kept.join(name)).filter(|p| p.exists()) };
    results.gateway = read(GATEWAY).map(|p| read_json(&p)).transpose()?;
    results.proxy = read(PROXY).map(|p| read_json(&p)).transpose()?;
    results.scale = read(SCALE).map(|p| read_json(&p)).transpose()?;
    results.broker = read(BROKER).map(|p| read_json(&p)).transpose()?;
    results.autoscaler_tick = read(TICK).map(|p| read_json(&p)).transpose()?;
    results.jetstream = read(JETSTREAM).map(|p| read_json(&p)).transpose()?;
    write_json(
        &kept.join(MACHINE),
        &serde_json::json!({ "machine": results.machine, "quick": results.quick }),
    )?;
    Ok(results)
}
