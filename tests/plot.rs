//! `inspect --plot FILE.svg`: the SVG is well-formed XML and holds, for every block, the three
//! series (pruning rate, delta std, bytes stored) of every matrix, with the values of the
//! file's index.

mod common;
use common::*;
use serde_json::Value;

/// The block number and matrix name of a tensor name, written out independently of the tool.
fn split_block(name: &str) -> Option<(usize, String)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, matrix) = rest.split_once('.')?;
    Some((n.parse().ok()?, matrix.to_string()))
}

/// The bytes of a tensor's records, from its index entry.
fn record_bytes(t: &Value) -> u64 {
    let len = |v: &Value| v["len"].as_u64().unwrap_or(0);
    match t["kind"].as_str().unwrap() {
        "compressed" => len(&t["positions"]) + len(&t["levels"]) + len(&t["tail"]),
        "coded" | "raw" => len(&t["data"]),
        _ => 0,
    }
}

#[test]
fn plot_shows_the_three_series_for_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_file(dir.path(), &["--layers", "3"]);
    let svg_path = dir.path().join("plot.svg");
    ok(udelta(&[
        "inspect",
        s(&file),
        "--totals",
        "--plot",
        s(&svg_path),
    ]));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the plot is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let cells: Vec<roxmltree::Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("class") == Some("cell"))
        .collect();
    let index = read_index(&file);
    let mut in_blocks = 0;
    for t in index["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let Some((block, matrix)) = split_block(name) else {
            // Outside the blocks: listed by name.
            assert!(svg.contains(&format!("data-name=\"{name}\"")), "{name}");
            continue;
        };
        in_blocks += 1;
        for series in ["rate", "std", "bytes"] {
            let found: Vec<&roxmltree::Node> = cells
                .iter()
                .filter(|c| {
                    c.attribute("data-series") == Some(series)
                        && c.attribute("data-block") == Some(&block.to_string())
                        && c.attribute("data-matrix") == Some(matrix.as_str())
                })
                .collect();
            assert_eq!(found.len(), 1, "{series} of {name}");
            let value = found[0].attribute("data-value").unwrap();
            let compressed = t["kind"] == "compressed";
            let want = match series {
                "rate" if compressed => Some(t["rate"].as_f64().unwrap()),
                "std" if compressed => Some(t["std"].as_f64().unwrap()),
                "bytes" => Some(record_bytes(t) as f64),
                _ => None,
            };
            match want {
                Some(w) => assert_eq!(value.parse::<f64>().unwrap(), w, "{series} of {name}"),
                None => assert_eq!(value, "", "{series} of {name}"),
            }
        }
    }
    // 3 blocks x (7 linears + 2 norms), each in the three panels.
    assert_eq!(in_blocks, 27);
    assert_eq!(cells.len(), 3 * 27);
    let panels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("panel"))
        .map(|n| n.attribute("data-series").unwrap())
        .collect();
    assert_eq!(panels, ["rate", "std", "bytes"]);
}

#[test]
fn plot_of_a_bad_path_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_file(dir.path(), &[]);
    let bad = dir.path().join("no/such/dir/plot.svg");
    fails(
        udelta(&["inspect", s(&file), "--plot", s(&bad)]),
        &["parent directory does not exist"],
    );
}
