//! The report writer on a small fixed result set: the Markdown it writes links only plots that
//! exist, every plot is well-formed SVG carrying the machine's caption, and the tables hold the
//! fixture's figures. The benchmarks themselves are not run here.

use std::path::{Path, PathBuf};

use loadtests::results::{Results, read_json};

fn fixture() -> Results {
    read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/results.json"))
        .expect("the fixture parses")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mecha-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The targets of Markdown image links, `![alt](target)`.
fn image_links(markdown: &str) -> Vec<String> {
    markdown
        .split("![")
        .skip(1)
        .filter_map(|rest| rest.split_once("](")?.1.split_once(')'))
        .map(|(target, _)| target.to_string())
        .collect()
}

#[test]
fn writes_markdown_whose_plots_exist_and_are_well_formed_svg() {
    let results = fixture();
    let dir = out_dir("full");
    let files = loadtests::report::write(&results, &dir).expect("the report is written");
    let markdown = std::fs::read_to_string(dir.join("README.md")).expect("README.md written");
    let links = image_links(&markdown);
    let mut expected = vec![
        "proxy-throughput.svg",
        "proxy-cpu.svg",
        "hop-latency-cdf.svg",
        "cold-start.svg",
        "ramp.svg",
        "broker-ingest.svg",
        "delivery-cdf.svg",
    ];
    let mut got: Vec<&str> = links.iter().map(String::as_str).collect();
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, expected, "every plot linked once");
    let caption = "2 cores, Test CPU &lt;fixture&gt; &amp; co, 2026-11-30 18:00 UTC; baseline measured in the same run";
    for link in &links {
        let path = dir.join(link);
        assert!(files.contains(&path), "{link} is among the files written");
        let svg = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{link}: {e}"));
        let doc = roxmltree::Document::parse(&svg)
            .unwrap_or_else(|e| panic!("{link} is not well-formed XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg", "{link}");
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .collect();
        assert!(
            texts.iter().any(|t| t.contains("Test CPU <fixture> & co")
                && t.contains("baseline measured in the same run")),
            "{link} carries the machine caption; texts: {texts:?}"
        );
        assert!(svg.contains(caption), "{link}: the caption is escaped");
        let drawn = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline") || n.has_tag_name("rect"))
            .count();
        assert!(drawn > 3, "{link} draws data ({drawn} shapes)");
    }
    // Figures from the fixture, next to their baselines.
    for needle in [
        // Older results: no rounds.
        "| 1 | 3000 | 9000 | 0.33 (0.33–0.33) | — | — | — | — |",
        // Medians over rounds; the ratio is the median of each round's (0.40, 0.60, 0.30).
        "| 32 | 20000 | 50000 | 0.40 (0.30–0.60) | 45000 | 0.44 | 30.0 + 18.0 | 25.0 |",
        "| process start (baseline) | 62.0 | 64.0 | 64.0 |",
        "**Not measured in this run:** a-benchmark exited with exit status: 1",
        "nginx (baseline)",
        "20000 events waiting",
        "in `--quick` mode",
        "## Making your own",
        "| 1 | 15000 | 45000 | 0.33 | 29.0, 13.5, 12.8 | 9.1, 7.2 |",
    ] {
        assert!(
            markdown.contains(needle),
            "README lacks {needle:?}:\n{markdown}"
        );
    }
}

#[test]
fn a_run_with_some_benchmarks_missing_links_only_what_it_drew() {
    let mut results = fixture();
    results.proxy = None;
    results.broker = None;
    let dir = out_dir("partial");
    loadtests::report::write(&results, &dir).expect("the report is written");
    let markdown = std::fs::read_to_string(dir.join("README.md")).expect("README.md written");
    let links = image_links(&markdown);
    assert_eq!(links.len(), 3, "hops, cold start and ramp only: {links:?}");
    for link in links {
        assert!(dir.join(&link).is_file(), "{link} exists");
    }
    assert!(!dir.join("proxy-throughput.svg").exists());
    assert!(!markdown.contains("## Broker ingest"));
    let _ = std::fs::remove_dir_all(&dir);
}
