//! End to end in a real browser: `lcm serve` with the tiny LCM fixture and the shipped motion
//! model, headless Chromium at a phone-sized window driven over the DevTools protocol. It loads
//! the page, types a prompt, clicks Generate, waits for the image and saves a screenshot (under
//! the target dir's test tmp); in live sketch mode draws strokes with the mouse and sees img2img
//! results follow them; in motion mode, at a phone and a desktop viewport, gets motions, sees the
//! player animate and stop, and downloads a BVH that parses.
//!
//! Skipped, loudly, when no Chromium is installed, unless LCM_REQUIRE_BROWSER=1 (CI sets it).

mod common;
mod serve_common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use serve_common::{get, ServeProcess};

fn find_chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LCM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A DevTools session on one page: numbered commands, events skipped.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::text(msg))
            .expect("send to the browser");
        loop {
            let m = self.ws.read().expect("read from the browser");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate a JavaScript expression and return its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn wait_for(&mut self, what: &str, expr: &str, limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            let v = self.eval(expr);
            if !(v.is_null() || v == json!(false) || v == json!(0)) {
                return v;
            }
            if t.elapsed() >= limit {
                let said = self.eval("document.getElementById('status').textContent");
                panic!("timed out waiting for {what}; the page says {said}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// (width, height, mobile) of the viewports the page is tested at.
const PHONE: (u32, u32, bool) = (390, 844, true);
const DESKTOP: (u32, u32, bool) = (1280, 900, false);

fn viewport(cdp: &mut Cdp, (width, height, mobile): (u32, u32, bool)) {
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
    );
}

/// Click the centre of the element `id` with the mouse.
fn click(cdp: &mut Cdp, id: &str) {
    let rect = cdp.eval(&format!(
        "(() => {{ const b = document.getElementById('{id}'); b.scrollIntoView(); \
         const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
    ));
    let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
    for kind in ["mousePressed", "mouseReleased"] {
        cdp.call(
            "Input.dispatchMouseEvent",
            json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
        );
    }
}

/// A PNG screenshot of the viewport, saved as `name` under the test tmp dir; checked not blank.
fn screenshot(cdp: &mut Cdp, name: &str, size: (u32, u32)) -> PathBuf {
    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&out, &png).unwrap();
    let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .expect("the screenshot is a PNG")
        .to_rgb8();
    assert_eq!(img.dimensions(), size);
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 50,
        "blank screenshot ({} colours)",
        colours.len()
    );
    eprintln!("screenshot: {}", out.display());
    out
}

/// A served fixture model and headless Chromium on its page at a phone-sized viewport, the model
/// list loaded; `None` (said loudly) without Chromium unless LCM_REQUIRE_BROWSER=1.
struct Session {
    cdp: Cdp,
    _browser: Browser,
    _server: ServeProcess,
}

fn open_page(test: &str) -> Option<Session> {
    let Some(chromium) = find_chromium() else {
        if std::env::var("LCM_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("LCM_REQUIRE_BROWSER=1 but no chromium found (install Debian's `chromium`)");
        }
        eprintln!("\n*** SKIPPED {test}: no chromium in PATH (apt-get install chromium; .ci/run does) ***\n");
        return None;
    };
    let fx = common::fixtures().join("tiny-lcm");
    let server = ServeProcess::spawn(&["--model", fx.to_str().unwrap()]);
    assert_eq!(get(server.addr, "/healthz").status, 200);

    let profile = std::env::temp_dir().join(format!("lcm-browser-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            // A phone-width window.
            "--window-size=390,844",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr gives the port.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let browser = Browser { child, profile };
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining stderr (Chromium logs a lot) so that it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                let _ = tx.send(rest.split('/').next().and_then(|p| p.parse::<u16>().ok()));
            }
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
    let port = port.expect("chromium printed no DevTools address");
    let devtools = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // The page target's own websocket.
    let t = Instant::now();
    let ws_url = loop {
        let list = get(devtools, "/json/list").json();
        let page = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string));
        if let Some(u) = page {
            break u;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no page target");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stream = TcpStream::connect(devtools).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let (ws, _) = tungstenite::client(ws_url.as_str(), stream).expect("DevTools websocket");
    let mut cdp = Cdp { ws, next_id: 0 };

    cdp.call("Page.enable", json!({}));
    // A phone: 390 CSS pixels wide, mobile viewport rules.
    viewport(&mut cdp, PHONE);
    cdp.call(
        "Page.navigate",
        json!({"url": format!("http://{}/", server.addr)}),
    );
    // Loaded, and the model list has filled the header and the size menu.
    let model = cdp.wait_for(
        "the model list",
        "document.readyState === 'complete' && document.getElementById('size').options.length > 0 \
         && document.getElementById('model').textContent !== '…' \
         && document.getElementById('model').textContent",
        Duration::from_secs(30),
    );
    assert_eq!(model, "tiny-lcm");
    Some(Session {
        cdp,
        _browser: browser,
        _server: server,
    })
}

#[test]
fn page_generates_an_image_in_headless_chromium() {
    let Some(mut session) = open_page("generate") else {
        return;
    };
    let cdp = &mut session.cdp;

    // Type the prompt with keyboard input, then click Generate with the mouse.
    cdp.eval("document.getElementById('prompt').focus()");
    cdp.call("Input.insertText", json!({"text": "a photo of a cat"}));
    assert_eq!(
        cdp.eval("document.getElementById('prompt').value"),
        "a photo of a cat"
    );
    cdp.eval("document.getElementById('random-seed').click()");
    // Two images: the page sends one request each and shows them as they arrive.
    cdp.eval("document.getElementById('n').value = '2'");
    click(cdp, "generate");

    let widths = cdp.wait_for(
        "the generated images",
        "(() => { const imgs = [...document.querySelectorAll('#latest img')]; \
         return imgs.length === 2 && imgs.every(i => i.complete) \
           && imgs.map(i => i.naturalWidth); })()",
        Duration::from_secs(120),
    );
    assert_eq!(widths, json!([32, 32]), "the fixture model's native size");
    let captions = cdp.eval(
        "[...document.querySelectorAll('#latest figcaption')].map(c => c.textContent).sort()",
    );
    let seeds: Vec<u64> = captions
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let c = c.as_str().unwrap();
            assert!(c.contains(" s · a photo of a cat"), "{c}");
            c.split_whitespace().nth(1).unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        seeds.iter().max().unwrap() - seeds.iter().min().unwrap(),
        1,
        "{captions}"
    );
    assert_eq!(
        cdp.eval("document.querySelectorAll('#gallery img').length"),
        2
    );
    // Phone width: nothing overflows sideways.
    assert_eq!(
        cdp.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        true
    );

    screenshot(cdp, "browser-e2e.png", (390, 844));
    drop(session);
}

/// Live sketch mode: strokes drawn with the mouse on the canvas are sent as img2img while they
/// change; at least two different images come back and never more than one request is in flight.
#[test]
fn live_sketch_mode_follows_the_strokes_with_one_request_in_flight() {
    let Some(mut session) = open_page("live") else {
        return;
    };
    let cdp = &mut session.cdp;
    cdp.eval("document.getElementById('sketch-panel').open = true");
    cdp.eval("document.getElementById('prompt').focus()");
    cdp.call("Input.insertText", json!({"text": "a photo of a cat"}));
    cdp.eval("document.getElementById('seed').value = '5'");
    cdp.eval("document.getElementById('live').click()");
    let stroke = |cdp: &mut Cdp, colour: &str, from: (f64, f64), to: (f64, f64)| {
        cdp.eval(&format!(
            "document.getElementById('brush-colour').value = '{colour}'"
        ));
        let r = cdp.eval(
            "(() => { const c = document.getElementById('sketch'); c.scrollIntoView(); \
             const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()",
        );
        let (x, y, w, h) = (
            r[0].as_f64().unwrap(),
            r[1].as_f64().unwrap(),
            r[2].as_f64().unwrap(),
            r[3].as_f64().unwrap(),
        );
        let at = |f: (f64, f64)| (x + f.0 * w, y + f.1 * h);
        let mouse = |cdp: &mut Cdp, kind: &str, p: (f64, f64)| {
            cdp.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": p.0, "y": p.1, "button": "left", "buttons": 1, "clickCount": 1}),
            );
        };
        mouse(cdp, "mousePressed", at(from));
        for i in 1..=8 {
            let t = i as f64 / 8.0;
            let p = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
            mouse(cdp, "mouseMoved", at(p));
        }
        mouse(cdp, "mouseReleased", at(to));
    };
    stroke(cdp, "#d02020", (0.2, 0.2), (0.8, 0.8));
    cdp.wait_for(
        "a first live image",
        "window.lcmLive.shown >= 1",
        Duration::from_secs(120),
    );
    stroke(cdp, "#2040e0", (0.8, 0.1), (0.1, 0.9));
    stroke(cdp, "#20c040", (0.1, 0.5), (0.9, 0.5));
    let n = cdp.wait_for(
        "a second, different live image",
        "window.lcmLive.images.size >= 2 && window.lcmLive.images.size",
        Duration::from_secs(120),
    );
    assert!(n.as_u64().unwrap() >= 2);
    let live = cdp.eval(
        "({max: window.lcmLive.maxInFlight, sent: window.lcmLive.sent, shown: window.lcmLive.shown})",
    );
    assert_eq!(live["max"], 1, "{live}");
    // The shown image is the model's size and the page says it is live.
    let (w, caption) = (
        cdp.eval("document.querySelector('#latest img').naturalWidth"),
        cdp.eval("document.querySelector('#latest figcaption').textContent"),
    );
    assert_eq!(w, 32);
    assert!(caption.as_str().unwrap().starts_with("live"), "{caption}");
    eprintln!("live mode: {live}");
}

/// Motion mode at a phone and a desktop viewport: the tab switches to the motion model's own
/// defaults and example prompts; a typed prompt gives motions whose player animates (the canvas
/// changes between frames, the scrubber moves) and stops when paused; the BVH link downloads a
/// file that parses to the asked length.
#[test]
fn motion_mode_plays_pauses_and_downloads_a_bvh() {
    let Some(mut session) = open_page("motion") else {
        return;
    };
    let cdp = &mut session.cdp;
    let downloads = std::env::temp_dir().join(format!("lcm-browser-dl-{}", std::process::id()));
    std::fs::create_dir_all(&downloads).unwrap();
    cdp.call(
        "Browser.setDownloadBehavior",
        json!({"behavior": "allow", "downloadPath": downloads.to_str().unwrap()}),
    );
    let passes = [
        (PHONE, 1, 2, "a person walks forward", "motion-phone.png"),
        (
            DESKTOP,
            3,
            4,
            "a person walks forward and turns left",
            "motion-desktop.png",
        ),
    ];
    for (view, n, seconds, prompt, shot) in passes {
        viewport(cdp, view);
        click(cdp, "mode-motion");
        // The motion model's defaults (pipelines/tiny-motion.toml) and its example prompts.
        let (model, steps, guidance, default_seconds) = (
            cdp.eval("document.getElementById('model').textContent"),
            cdp.eval("document.getElementById('steps').value"),
            cdp.eval("document.getElementById('guidance').value"),
            cdp.eval("document.getElementById('seconds').value"),
        );
        assert_eq!(
            (model, steps, guidance, default_seconds),
            (json!("tiny-motion"), json!("1"), json!("7.5"), json!("4"))
        );
        let chips =
            cdp.eval("[...document.querySelectorAll('#examples .chip')].map(c => c.textContent)");
        assert!(chips.as_array().unwrap().len() >= 3, "{chips}");
        assert_eq!(
            cdp.eval("document.getElementById('size').offsetParent === null"),
            true,
            "the image size menu shows in motion mode"
        );
        // Type the prompt; the length, n motions, a fixed seed.
        cdp.eval("document.getElementById('prompt').value = ''");
        cdp.eval("document.getElementById('prompt').focus()");
        cdp.call("Input.insertText", json!({ "text": prompt }));
        cdp.eval(&format!(
            "document.getElementById('seconds').value = '{seconds}'"
        ));
        cdp.eval(&format!("document.getElementById('n').value = '{n}'"));
        cdp.eval("document.getElementById('seed').value = '9'");
        cdp.eval("window.lcmMotion.players.length = 0");
        click(cdp, "generate");
        cdp.wait_for(
            "the motions",
            &format!("window.lcmMotion.players.length === {n} && window.lcmMotion.draws > 0"),
            Duration::from_secs(120),
        );
        assert_eq!(
            cdp.eval("window.lcmMotion.players.map(p => p.joints.length)"),
            json!(vec![20 * seconds; n])
        );
        // Playing: frames differ and the scrubber moves.
        let frame = "document.querySelector('#motions canvas').toDataURL()";
        let scrub = "parseInt(document.getElementById('scrub').value, 10)";
        let (a, s0) = (cdp.eval(frame), cdp.eval(scrub));
        std::thread::sleep(Duration::from_millis(400));
        let (b, s1) = (cdp.eval(frame), cdp.eval(scrub));
        assert_ne!(a, b, "the canvas did not change while playing");
        assert_ne!(s0, s1, "the scrubber did not move while playing");
        // Paused: nothing changes.
        click(cdp, "play");
        assert_eq!(cdp.eval("window.lcmMotion.clock.playing"), false);
        std::thread::sleep(Duration::from_millis(100));
        let c = cdp.eval(frame);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(c, cdp.eval(frame), "the canvas changed while paused");
        // Side by side at desktop width, stacked on a phone; nothing overflows sideways.
        let tops = cdp.eval(
            "[...document.querySelectorAll('#motions canvas')].map(c => Math.round(c.getBoundingClientRect().top))",
        );
        if view == DESKTOP {
            assert_eq!(tops[0], tops[1], "motions not side by side: {tops}");
        }
        assert_eq!(
            cdp.eval("document.documentElement.scrollWidth <= window.innerWidth"),
            true
        );
        // The last frame, with the whole path, for the picture.
        cdp.eval(
            "(() => { const s = document.getElementById('scrub'); s.value = s.max; \
             s.dispatchEvent(new Event('input')); })()",
        );
        screenshot(cdp, shot, (view.0, view.1));
    }
    // The first motion's BVH link: a file that parses, 4 s at 20 fps.
    cdp.eval("document.querySelector('#motions .download-bvh').click()");
    let file = downloads.join("motion-9.bvh");
    let t = Instant::now();
    while !file.is_file() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no BVH download in {}",
            downloads.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let bvh = lcm::motion::bvh::Bvh::parse(&text).expect("the downloaded BVH parses");
    let (clip, fps) = bvh.to_joints().unwrap();
    assert_eq!((clip.len(), fps), (80, 20.0));
    std::fs::remove_dir_all(&downloads).ok();
}
