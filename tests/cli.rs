//! The `xsrec` binary as a user runs it: synth → train → eval → explain, and bad input.
use std::path::Path;
use std::process::{Command, Output};

fn xsrec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xsrec"))
        .args(args)
        .output()
        .expect("run xsrec")
}

fn ok(args: &[&str]) -> String {
    let out = xsrec(args);
    assert!(
        out.status.success(),
        "xsrec {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn failure(args: &[&str]) -> String {
    let out = xsrec(args);
    assert!(!out.status.success(), "xsrec {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The small cluster-chain log the training tests share: 300 users, 120 items.
fn synthesize_log(data: &Path) {
    ok(&[
        "data",
        "synth",
        "--users",
        "300",
        "--items",
        "120",
        "--seed",
        "3",
        "--out",
        path(data),
    ]);
}

#[test]
fn synth_train_eval_explain_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("events.csv");
    let model = dir.path().join("model");
    synthesize_log(&data);
    let train_out = ok(&[
        "train",
        "--data",
        path(&data),
        "--out",
        path(&model),
        "--epochs",
        "3",
        "--max-len",
        "20",
        "--d-model",
        "16",
        "--layers",
        "1",
        "--keep-candidates",
        "--quiet",
    ]);
    assert!(train_out.contains("| model (test) | all | 300 |"), "{train_out}");
    for file in [
        "config.json",
        "model.safetensors",
        "items.tsv",
        "curves.png",
        "epochs.json",
    ] {
        assert!(model.join(file).exists(), "{file} missing");
    }
    let config = read_json(&model.join("config.json"));
    assert_eq!(
        config["model"]["features"]["event_type"], true,
        "synthetic data has event types"
    );
    assert_eq!(config["info"]["epochs_run"], 3);
    // The default recipe trains the model without and with its readouts and keeps the readouts
    // only when their validation gain's interval is above zero, over all validation events or
    // over those that open a session.
    let candidates = config["info"]["candidates"].as_array().unwrap();
    let readouts = |features: &serde_json::Value| {
        (
            features["session_successor"].as_bool().unwrap(),
            features["clock_readout"].as_bool().unwrap(),
        )
    };
    let tried: Vec<_> = candidates.iter().map(|c| readouts(&c["features"])).collect();
    assert_eq!(tried, [(false, false), (true, true)]);
    let gain = &candidates[1]["validation_gain"];
    let (lower, upper) = (
        gain["all"]["lower"].as_f64().unwrap(),
        gain["all"]["upper"].as_f64().unwrap(),
    );
    assert!(lower <= upper, "{gain}");
    let starts_lower = gain["session_starts"]["lower"].as_f64().unwrap_or(f64::NEG_INFINITY);
    let best = &candidates[usize::from(lower > 0.0 || starts_lower > 0.0)];
    assert_eq!(config["model"]["features"], best["features"]);
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    let kept: Vec<_> = ["with-readouts", "without-readouts"]
        .into_iter()
        .filter(|name| read_json(&model.join("candidates").join(name).join("config.json"))["info"]["kept"] == true)
        .collect();
    assert_eq!(kept.len(), 1, "exactly one candidate is kept: {kept:?}");
    assert_eq!(weights(&model.join("candidates").join(kept[0])), weights(&model));
    let validation = config["info"]["metrics"]["validation"]["all"]["means"]["NDCG@10"]
        .as_f64()
        .unwrap();
    assert!(
        (validation - best["validation_ndcg10"].as_f64().unwrap()).abs() < 1e-5,
        "the kept model scores {validation} on validation, not its recorded {}",
        best["validation_ndcg10"]
    );

    let predictions = dir.path().join("predictions.tsv");
    let json = dir.path().join("eval.json");
    let eval_out = ok(&[
        "eval",
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--predictions-out",
        path(&predictions),
        "--json-out",
        path(&json),
    ]);
    assert!(eval_out.contains("paired bootstrap CI"), "{eval_out}");
    let lines: Vec<String> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 300);
    for line in &lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 21, "user + top-20: {line}");
        assert!(fields[0].starts_with('u') && fields[1..].iter().all(|f| f.starts_with('i')));
    }
    // The model's own evaluation at training time and a later `eval` agree exactly.
    let report = read_json(&json);
    assert_eq!(report["test"], config["info"]["metrics"]["test"]);

    let png = dir.path().join("why.png");
    let explain = |user| {
        [
            "explain",
            "--model",
            path(&model),
            "--data",
            path(&data),
            "--user",
            user,
            "--out",
            path(&png),
        ]
    };
    let explain_out = ok(&explain("u7"));
    assert_eq!(explain_out.lines().count(), 10);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // With titles in the item metadata, each recommendation is printed with its title.
    let meta = dir.path().join("titles.tsv");
    let mut titles = String::from("item_id\tcategories\ttitle\n");
    for line in explain_out.lines() {
        let item = line.split('\t').nth(1).unwrap();
        titles += &format!("{item}\tdrama\tThe Film of {item}\n");
    }
    std::fs::write(&meta, titles).unwrap();
    let with_titles = ok(&[explain("u7").as_slice(), &["--item-meta", path(&meta)]].concat());
    for (plain, titled) in explain_out.lines().zip(with_titles.lines()) {
        let item = plain.split('\t').nth(1).unwrap();
        assert_eq!(
            titled.split('\t').nth(3),
            Some(format!("The Film of {item}").as_str()),
            "{titled}"
        );
    }
    assert!(failure(&explain("nobody")).contains("user `nobody` has no events"));
}

#[test]
fn malformed_rows_stop_the_load_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("events.csv");
    let mut text = String::from("user_id,item_id,timestamp\n");
    for u in 0..20 {
        for t in 0..5 {
            text += &format!("u{u},i{},{}\n", (u + t) % 7, 1000 + t * 60);
        }
    }
    text += "u1,i2,yesterday\n";
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("m");
    let train = |extra: &[&'static str]| {
        let base = [
            "train",
            "--data",
            path(&data),
            "--out",
            path(&out),
            "--epochs",
            "1",
            "--quiet",
        ];
        [&base[..], extra].concat()
    };
    let err = failure(&train(&[]));
    assert!(err.contains("events.csv:102:") && err.contains("yesterday"), "{err}");
    let trained = xsrec(&train(&["--max-len", "8", "--skip-bad-rows"]));
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    assert!(String::from_utf8_lossy(&trained.stderr).contains("skipped 1 malformed rows"));
    for weight in [
        "--session-start-weight=0",
        "--session-start-weight=-1",
        "--session-start-weight=NaN",
    ] {
        let err = failure(&train(&["--skip-bad-rows", weight]));
        assert!(
            err.contains("--session-start-weight must be a positive number"),
            "{err}"
        );
    }
    let err = failure(&["train", "--data", "nowhere.parquet", "--out", path(&out)]);
    assert!(err.contains("nowhere.parquet"), "{err}");
    assert!(failure(&[
        "eval",
        "--model",
        path(&dir.path().join("absent")),
        "--data",
        path(&data)
    ])
    .contains("config.json"));
}

#[test]
fn bench_commands_write_a_servable_model_and_complete_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("untrained");
    let shape = ["--items", "300", "--d-model", "8", "--max-len", "12", "--layers", "1"];
    ok(&[&["bench", "init-model", "--out", path(&model)][..], &shape].concat());
    let artifact = xsrec::model::Artifact::load(&model, tch::Device::Cpu).unwrap();
    assert_eq!(artifact.items.len(), 301);
    assert_eq!(artifact.items.id(1), "i1");
    assert_eq!(artifact.model.config.max_len, 12);

    let report = dir.path().join("forward.json");
    let plot = dir.path().join("forward.png");
    let table = ok(&[
        "bench",
        "forward",
        "--device",
        "cpu",
        "--precision",
        "bf16",
        "--model",
        path(&model),
        "--batch-sizes",
        "1,3",
        "--iters",
        "2",
        "--out",
        path(&report),
        "--plot",
        path(&plot),
    ]);
    assert!(table.contains("device ms"), "{table}");
    assert!(std::fs::metadata(&plot).unwrap().len() > 1000);
    let report = read_json(&report);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["batch_size"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    for row in rows {
        assert!(row["device_ms"].as_f64().unwrap() > 0.0 && row["floor_ms"].as_f64().unwrap() > 0.0);
    }

    let report = dir.path().join("parity.json");
    ok(&[
        "bench",
        "parity",
        "--device",
        "cpu",
        "--model",
        path(&model),
        "--users",
        "20",
        "--out",
        path(&report),
    ]);
    let report = read_json(&report);
    assert_eq!(report["agreement"]["fp32"]["identical_lists"], 20);
    assert!(report["agreement"]["bf16"]["mean_overlap"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_killed_training_resumes_to_the_artifact_the_whole_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("events.csv");
    synthesize_log(&data);
    let run = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            path(&data),
            "--out",
            path(out),
            "--epochs",
            "8",
            "--readouts",
            "off",
            "--max-len",
            "20",
            "--seed",
            "1",
            "--threads",
            "1",
            "--quiet",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let (whole, killed) = (dir.path().join("whole"), dir.path().join("killed"));
    ok(&run(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!whole.join("checkpoint").exists(), "a finished run keeps no checkpoint");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xsrec"))
        .args(run(&killed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let second = killed.join("checkpoint/without-readouts/epoch-0002.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !second.exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint of epoch 2");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to tidy up
    child.wait().unwrap();
    assert!(!killed.join("model.safetensors").exists());
    let mut resume = run(&killed);
    resume.push("--resume".into());
    let out = xsrec(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after epoch"), "{stderr}");
    assert_eq!(
        std::fs::read(killed.join("model.safetensors")).unwrap(),
        std::fs::read(whole.join("model.safetensors")).unwrap()
    );
    let curve = |dir: &Path| -> Vec<(serde_json::Value, serde_json::Value)> {
        read_json(&dir.join("epochs.json"))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["train_loss"].clone(), e["validation_ndcg10"].clone()))
            .collect()
    };
    assert_eq!(curve(&killed), curve(&whole));
    assert!(!killed.join("checkpoint").exists());
}
