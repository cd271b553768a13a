//! Smoke test of the CDP driver against a real headless Chromium.

use std::time::Duration;

use e2e::cdp::{Browser, LaunchOptions};
use e2e::console::{ensure_only_expected, Allowed};
use serde_json::json;

#[tokio::test]
#[ignore = "needs Chromium; run by cargo xtask test"]
async fn cdp_smoke() -> anyhow::Result<()> {
    let browser = Browser::launch(LaunchOptions::default()).await?;
    let html = "data:text/html,<title>smoke</title><p>hello</p>\
                <script>console.error('boom', 42)</script>";
    let page = browser.new_page(html).await?;

    assert_eq!(page.eval("1+1").await?, json!(2));
    assert_eq!(page.eval("document.title").await?, json!("smoke"));
    assert_eq!(
        page.eval("new Promise(r => setTimeout(() => r('late'), 50))")
            .await?,
        json!("late")
    );
    let err = page
        .eval("(() => { throw new Error('kaput') })()")
        .await
        .expect_err("a thrown exception must be an Err");
    assert!(format!("{err:#}").contains("kaput"), "{err:#}");

    // The error logged during load is captured, and so is a later one.
    page.eval("console.error('later'); undefined").await?;
    page.wait_for("true", Duration::from_secs(1)).await?;
    let errors = page.console_errors();
    assert!(errors.iter().any(|e| e.contains("boom 42")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("later")), "{errors:?}");
    // And nothing else: the exception thrown inside `eval` is the call's error, not an error
    // of the page.
    ensure_only_expected(
        "the smoke page",
        &errors,
        &[
            Allowed {
                why: "logged by the page on purpose",
                all_of: &["console.error: boom 42"],
            },
            Allowed {
                why: "logged by the test on purpose",
                all_of: &["console.error: later"],
            },
        ],
    )?;

    let dir = tempfile::tempdir()?;
    let png = dir.path().join("smoke.png");
    page.screenshot(&png).await?;
    let bytes = std::fs::read(&png)?;
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    assert!(browser.rss_mb() > 10.0, "rss {}", browser.rss_mb());
    let target = page.target_id().to_owned();
    page.close().await?;
    let targets = browser.call("Target.getTargets", json!({})).await?;
    assert!(
        !targets.to_string().contains(&target),
        "closed target still listed"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs Chromium; run by cargo xtask test"]
async fn cdp_many_pages() -> anyhow::Result<()> {
    const PAGES: usize = 50;
    let browser = Browser::launch(LaunchOptions::default()).await?;
    let urls: Vec<String> = (0..PAGES)
        .map(|i| format!("data:text/html,<p>page {i}</p>"))
        .collect();
    let pages =
        futures_util::future::try_join_all(urls.iter().map(|u| browser.new_page(u))).await?;
    let texts =
        futures_util::future::try_join_all(pages.iter().map(|p| p.eval("document.body.innerText")))
            .await?;
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &json!(format!("page {i}")));
    }
    // Background tabs keep running timers at full rate.
    let ticks = pages[0]
        .eval("new Promise(r => { let n = 0; const t = setInterval(() => { if (++n == 10) { clearInterval(t); r(n) } }, 10) })")
        .await?;
    assert_eq!(ticks, json!(10));
    // A page in its own window is visible.
    let visible = browser
        .new_page_with(
            "data:text/html,visible",
            e2e::cdp::PageOptions { new_window: true },
        )
        .await?;
    assert_eq!(
        visible.eval("document.visibilityState").await?,
        json!("visible")
    );
    eprintln!(
        "{} pages: rss {:.0} MiB, pss {:.0} MiB",
        PAGES + 1,
        browser.rss_mb(),
        browser.pss_mb()
    );
    for (i, p) in pages.iter().chain([&visible]).enumerate() {
        ensure_only_expected(&format!("page {i}"), &p.console_errors(), &[])?;
    }
    for p in pages {
        p.close().await?;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs Chromium; run by cargo xtask test"]
async fn calls_fail_at_once_when_the_browser_dies() -> anyhow::Result<()> {
    let browser = Browser::launch(LaunchOptions::default()).await?;
    let page = browser.new_page("data:text/html,<p>doomed</p>").await?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &browser.pid().to_string()])
        .status()?;
    assert!(killed.success(), "kill failed: {killed}");
    let started = std::time::Instant::now();
    let err = page
        .eval("new Promise(() => {})")
        .await
        .expect_err("a call to a dead browser must fail");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}: {err:#}",
        started.elapsed()
    );
    // Chromium's connection reset, or its stderr closed (when the connection ends cleanly).
    let gone = |e: &anyhow::Error| {
        let e = format!("{e:#}");
        e.contains("DevTools connection") || e.contains("Chromium exited")
    };
    assert!(gone(&err), "{err:#}");
    let err = browser
        .version()
        .await
        .expect_err("a browser call must fail too");
    assert!(gone(&err), "{err:#}");
    Ok(())
}
