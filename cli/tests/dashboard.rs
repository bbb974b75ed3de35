//! The coordinator's dashboard in a real browser: headless Chromium (Debian's `chromium`)
//! opens `/` during a real 2-worker run. The DOM it renders must hold the curves and both
//! workers, and the screenshot must show the curves in their colours. `.ci/run` installs
//! chromium and runs this test (`--ignored`); the screenshot stays in
//! target/tmp/dashboard.png.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::http_get;

fn chromium() -> String {
    std::env::var("STACKWISE_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

fn browse(url: &str, what: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--window-size=1280,1100", "--virtual-time-budget=4000"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(what)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} ({e}): apt-get install chromium", chromium()))
}

/// Pixels within a small distance of `rgb`.
fn pixels_like(img: &image::RgbaImage, rgb: [u8; 3]) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|i| (p.0[i] as i32 - rgb[i] as i32).abs() <= 24))
        .count()
}

#[test]
#[ignore = "needs chromium: .ci/run installs it and runs this with --ignored"]
fn headless_chromium_shows_the_curves_and_workers_of_a_running_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 40_000);
    let cfg = common::tiny_job(
        dir.path(),
        "dash",
        &data,
        "steps: 100000, batch_size: 4, warmup_steps: 2, eval_every: 20, checkpoint_every: 1000",
    );
    let (_launch, addr) = common::launch_with_http(&cfg);

    // Enough of the run for curves: 40 logged steps and 2 validations on 2 ranks.
    let t = Instant::now();
    loop {
        let j: serde_json::Value = serde_json::from_str(&http_get(&addr, "/api/job")).unwrap();
        let h = &j["history"];
        if j["workers_alive"] == 2
            && h["step"].as_array().unwrap().len() >= 40
            && h["val_step"].as_array().unwrap().len() >= 2
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{j}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!("http://{addr}/");

    // The DOM after the page's script ran.
    let dom = browse(&url, &["--dump-dom"]);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let points: usize = html
        .split("data-points=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no data-points in the rendered page:\n{html}"));
    assert!(points >= 40, "{points} points");
    // Train and validation loss, tokens/s.
    assert!(html.matches("class=\"series\"").count() >= 3, "{html}");
    assert!(html.contains(">running<"), "{html}");
    for w in ["local-0", "local-1"] {
        assert!(
            html.contains(&format!("<td>{w}</td>")),
            "no worker {w}:\n{html}"
        );
    }

    // The picture: each curve's colour is drawn.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let o = browse(&url, &[&format!("--screenshot={}", shot.display())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&shot).unwrap().to_rgba8();
    assert_eq!(img.dimensions(), (1280, 1100));
    let (train, val, tps) = (
        pixels_like(&img, [47, 111, 222]),
        pixels_like(&img, [224, 99, 45]),
        pixels_like(&img, [42, 157, 106]),
    );
    assert!(
        train > 300 && val > 100 && tps > 300,
        "curve pixels: train {train}, validation {val}, tokens/s {tps} ({})",
        shot.display()
    );
    eprintln!(
        "screenshot {} (curve pixels: train {train}, validation {val}, tokens/s {tps})",
        shot.display()
    );
}
