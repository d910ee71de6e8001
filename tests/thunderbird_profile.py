"""Debian's Thunderbird, headless, as a test client: a profile and a running instance.

``build_profile`` writes a profile whose one outgoing server (``smtp1``) points at the
server under test: host, port, ``try_ssl`` (2 STARTTLS, 3 implicit TLS), ``authMethod``
3 (normal password), user name, ``clientidEnabled`` and ``clientid`` exactly as a user
would set them in the Config Editor, an identity using it, and prefs that stop every
network call Thunderbird makes on its own (updates, telemetry, add-ons, remote settings,
account provisioning): the tests run without internet. The test certificate is trusted
in the profile's NSS database (``certutil -A -t "CT,C,C"``: the peer flag ``P`` alone
does not make a self-signed certificate valid).

``Thunderbird`` starts ``thunderbird --headless --marionette`` on that profile and sends
with ``nsIMsgSend.createAndSendMessage`` in the chrome context, so Thunderbird's own
compose and SMTP code talk to the server. Its dialogs (the "Login to server ... failed"
prompt after a refused AUTH, the "Sending of the message failed" alert) are answered
from the script by a ``common-dialog-loaded`` observer, which records their text:
a modal dialog would otherwise stall the send and the Marionette script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.marionette import Marionette
from tests.sink import wait_until

THUNDERBIRD = shutil.which("thunderbird") or "/usr/bin/thunderbird"
CERTUTIL = shutil.which("certutil") or "/usr/bin/certutil"
START_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
STARTTLS, IMPLICIT_TLS = 2, 3  # mail.smtpserver.<key>.try_ssl
PASSWORD_CLEARTEXT = 3  # mail.smtpserver.<key>.authMethod: "Normal password"

# Prefs that keep a test instance off the network and free of first-run screens.
QUIET_PREFS: dict[str, object] = {
    "app.update.auto": False,
    "app.update.disabledForTesting": True,
    "app.update.enabled": False,
    "app.normandy.enabled": False,
    "browser.region.network.url": "",
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.policy.firstRunURL": "",
    "extensions.getAddons.cache.enabled": False,
    "extensions.update.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "mail.inappnotifications.enabled": False,
    "mail.provider.enabled": False,
    "mail.provider.suppress_dialog_on_startup": True,
    "mail.rights.override": True,
    "mail.shell.checkDefaultClient": False,
    "mail.startup.enabledMailCheckOnce": True,
    "mailnews.start_page.enabled": False,
    "messenger.startup.action": 0,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.server": "",
    "toolkit.telemetry.unified": False,
    "toolkit.startup.max_resumed_crashes": -1,
    "browser.shell.checkDefaultBrowser": False,
    "network.dns.disablePrefetch": True,
    # Marionette on a port of its own choice, written to MarionetteActivePort.
    "marionette.port": 0,
    # Thunderbird's SMTP log on stdout, for the failure messages of the tests.
    "mailnews.smtp.loglevel": "All",
    "mailnews.send.loglevel": "All",
    "devtools.console.stdout.chrome": True,
    "browser.dom.window.dump.enabled": True,  # dump(): the dialog marker send_and_retry waits on
}


@dataclass
class OutgoingServer:
    """What a user sets for one outgoing (SMTP) server."""

    port: int
    try_ssl: int
    username: str
    clientid: str | None  # None: the pref is not set at all
    clientid_enabled: bool = True
    hostname: str = "127.0.0.1"

    def prefs(self, key: str = "smtp1") -> dict[str, object]:
        prefix = f"mail.smtpserver.{key}."
        prefs: dict[str, object] = {
            prefix + "type": "smtp",
            prefix + "hostname": self.hostname,
            prefix + "port": self.port,
            prefix + "try_ssl": self.try_ssl,
            prefix + "authMethod": PASSWORD_CLEARTEXT,
            prefix + "username": self.username,
            prefix + "clientidEnabled": self.clientid_enabled,
        }
        if self.clientid is not None:
            prefs[prefix + "clientid"] = self.clientid
        return prefs


def user_js(prefs: dict[str, object]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


def build_profile(directory: Path, server: OutgoingServer, address: str, cafile: Path) -> Path:
    """A fresh profile in ``directory`` sending as ``address`` through ``server``."""
    directory.mkdir(parents=True, exist_ok=True)
    prefs = dict(QUIET_PREFS)
    prefs |= server.prefs("smtp1")
    prefs |= {
        "mail.smtpservers": "smtp1",
        "mail.smtp.defaultserver": "smtp1",
        "mail.identity.id1.useremail": address,
        "mail.identity.id1.fullName": address.split("@")[0].title(),
        "mail.identity.id1.smtpServer": "smtp1",
        "mail.identity.id1.fcc": False,
        "mail.identity.id1.valid": True,
    }
    (directory / "user.js").write_text(user_js(prefs))
    database = f"sql:{directory}"
    for argv in (
        [CERTUTIL, "-N", "-d", database, "--empty-password"],
        [CERTUTIL, "-A", "-n", "clientid-mta test", "-t", "CT,C,C", "-i", str(cafile)],
    ):
        if argv[1] == "-A":
            argv += ["-d", database]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")
    return directory


# Starts a send and returns at once: a modal dialog ends a running Marionette script (it
# returns null), so the result is kept on the main window, where RESULT_SCRIPT reads
# it. Every common dialog that opens meanwhile is recorded (title, text, buttons) and
# answered with Cancel (for the login prompt: stop retrying) or OK (an alert). With a
# ``retryFile``, the first dialog is held open instead (no Marionette command may come
# then: Marionette would dismiss it) until that file exists, and answered with Retry.
SEND_SCRIPT = r"""
const [sendId, from, to, subject, body, retryFile] = arguments;
const results = (Services.wm.getMostRecentWindow("mail:3pane").clientidMtaSends ??= {});
const { MailServices } = ChromeUtils.importESModule(
  "resource:///modules/MailServices.sys.mjs"
);
const dialogs = [];
const observer = {
  observe(subject) {
    const win = subject;
    const doc = win.document;
    const text = id => (doc.getElementById(id)?.textContent || "").trim();
    const buttons = [...doc.querySelectorAll("dialog")].flatMap(d =>
      ["accept", "cancel", "extra1", "extra2"]
        .map(name => d.getButton(name))
        .filter(b => b && !b.hidden)
        .map(b => b.label)
    );
    dialogs.push({ title: doc.title || text("infoTitle"), text: text("infoBody"), buttons });
    const dialog = doc.querySelector("dialog");
    if (retryFile && dialogs.length == 1) {
      dump(`clientid-mta test: ${sendId} holds a dialog\n`);
      const file = Cc["@mozilla.org/file/local;1"].createInstance(Ci.nsIFile);
      file.initWithPath(retryFile);
      const timer = win.setInterval(() => {
        if (file.exists()) {
          win.clearInterval(timer);
          dialog.acceptDialog();  // Retry
          dump(`clientid-mta test: ${sendId} pressed Retry\n`);
        }
      }, 50);
      return;
    }
    // Cancel (a refused login: stop retrying), or accept an alert; after the load.
    win.setTimeout(() => dialog.cancelDialog(), 0);
  },
};
Services.obs.addObserver(observer, "common-dialog-loaded");
const finish = result => {
  if (sendId in results) return;  // the first report is the verdict
  Services.obs.removeObserver(observer, "common-dialog-loaded");
  results[sendId] = { ...result, dialogs };
};
const fields = Cc["@mozilla.org/messengercompose/composefields;1"].createInstance(
  Ci.nsIMsgCompFields
);
fields.from = from;
fields.to = to;
fields.subject = subject;
fields.fcc = "nocopy://";
const listener = {
  QueryInterface: ChromeUtils.generateQI(["nsIMsgSendListener"]),
  onStartSending() {},
  onProgress() {},
  onStatus() {},
  onGetDraftFolderURI() {},
  onTransportSecurityError(msgId, status, secInfo, location) {
    finish({ status, error: "TLS error at " + location });
  },
  onSendNotPerformed(msgId, status) {
    finish({ status, error: "send not performed" });
  },
  onStopSending(msgId, status, msg) {
    finish({ status, error: msg || "" });
  },
};
const identity = MailServices.accounts.getIdentity("id1");
const send = Cc["@mozilla.org/messengercompose/send;1"].createInstance(Ci.nsIMsgSend);
send
  .createAndSendMessage(
    null, identity, "", fields, false, false, Ci.nsIMsgSend.nsMsgDeliverNow, null,
    "text/plain", body, null, null, listener, "", null, Ci.nsIMsgCompType.New
  )
  .catch(e => finish({ status: e.result || -1, error: String(e) }));
"""

RESULT_SCRIPT = r"""
const [sendId] = arguments;
const results = Services.wm.getMostRecentWindow("mail:3pane").clientidMtaSends ?? {};
return results[sendId] ?? null;
"""

STORE_PASSWORD = r"""
const [origin, username, password, done] = arguments;
const login = Cc["@mozilla.org/login-manager/loginInfo;1"].createInstance(Ci.nsILoginInfo);
login.init(origin, null, origin, username, password, "", "");
(async () => {
  for (const old of await Services.logins.searchLoginsAsync({ origin, httpRealm: origin })) {
    await Services.logins.removeLoginAsync(old);
  }
  await Services.logins.addLoginAsync(login);
  return (await Services.logins.searchLoginsAsync({ origin, httpRealm: origin })).length;
})().then(done, e => done(String(e)));
"""

SET_PREFS = r"""
const [prefs] = arguments;
for (const [name, value] of Object.entries(prefs)) {
  if (typeof value === "boolean") Services.prefs.setBoolPref(name, value);
  else if (typeof value === "number") Services.prefs.setIntPref(name, value);
  else Services.prefs.setCharPref(name, value);
}
"""


@dataclass
class SendResult:
    """What Thunderbird reported for one send: status 0 is success."""

    status: int
    error: str
    dialogs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sent(self) -> bool:
        return self.status == 0


class Thunderbird:
    """``thunderbird --headless --marionette`` on one profile, and a Marionette session."""

    def __init__(self, profile: Path, home: Path) -> None:
        self.profile = profile
        self.home = home
        self.log_path = profile.parent / f"{profile.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.marionette: Marionette | None = None
        self._sends = 0

    def log(self) -> str:
        """Thunderbird's stdout and stderr so far (its SMTP log included)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        for name in ("home", "config", "cache", "data", "runtime"):
            (self.home / name).mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {key: value for key, value in os.environ.items() if not key.startswith("MOZ_")} | {
            "HOME": str(self.home / "home"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "XDG_DATA_HOME": str(self.home / "data"),
            "XDG_RUNTIME_DIR": str(self.home / "runtime"),
            "TMPDIR": str(self.home),
            "MOZ_HEADLESS": "1",
            "MOZ_CRASHREPORTER_DISABLE": "1",
            "MOZ_DISABLE_AUTO_SAFE_MODE": "1",
            "MOZ_SANDBOX_LOGGING": "0",
        }
        env.pop("DISPLAY", None)
        env.pop("WAYLAND_DISPLAY", None)
        argv = [THUNDERBIRD, "--headless", "--marionette", "-remote-allow-system-access"]
        argv += ["--no-remote", "--profile", str(self.profile)]
        port_file = self.profile / "MarionetteActivePort"
        port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        process = self.process

        def port() -> int | None:
            if process.poll() is not None:
                raise RuntimeError(
                    f"thunderbird exited with {process.returncode}:\n{self.log()[-4000:]}"
                )
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text.isdigit() else None

        try:
            marionette_port = wait_until(port, START_TIMEOUT, "Marionette's port", interval=0.1)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"thunderbird did not open Marionette in {START_TIMEOUT} s:\n{self.log()[-4000:]}"
            ) from None
        self.marionette = Marionette(marionette_port)
        self.marionette.start_session()

    def session(self) -> Marionette:
        assert self.marionette is not None, "Thunderbird is not started"
        return self.marionette

    def store_password(self, username: str, password: str, hostname: str = "127.0.0.1") -> None:
        """Save the SMTP password in the login manager, where Thunderbird looks first."""
        origin = f"smtp://{hostname}"
        stored = self.session().run_async(STORE_PASSWORD, [origin, username, password])
        assert stored == 1, f"the login manager holds {stored} logins for {origin}"

    def set_prefs(self, prefs: dict[str, object]) -> None:
        """Change prefs in the running instance (as the Config Editor does)."""
        self.session().run(SET_PREFS, [prefs])

    def send(self, sender: str, recipient: str, subject: str, body: str) -> SendResult:
        """Compose and send one plain-text message now; Thunderbird's verdict."""
        return self._result(self._start_send([sender, recipient, subject, body, ""]))

    def send_and_retry(
        self, sender: str, recipient: str, subject: str, body: str, before_retry: Callable[[], None]
    ) -> SendResult:
        """Send; when the first dialog (the login failure) opens, call ``before_retry``
        and then press Retry in it, as a user would after the device was approved."""
        release = self.profile.parent / f"{self.profile.name}-retry-{self._sends + 1}"
        send_id = self._start_send([sender, recipient, subject, body, str(release)])
        self._wait_for_marker(f"{send_id} holds a dialog")
        before_retry()
        release.touch()
        # No Marionette command until then: it would dismiss the dialog (Cancel).
        self._wait_for_marker(f"{send_id} pressed Retry")
        return self._result(send_id)

    def _wait_for_marker(self, what: str) -> None:
        """Wait until the send script has dumped ``what`` to Thunderbird's output."""
        line = f"clientid-mta test: {what}\n"
        try:
            wait_until(lambda: line in self.log() or None, SEND_TIMEOUT, what)
        except TimeoutError:
            raise AssertionError(
                f"Thunderbird: no {what!r} in {SEND_TIMEOUT} s:\n{self.log()[-4000:]}"
            ) from None

    def _start_send(self, arguments: list[str]) -> str:
        self._sends += 1
        send_id = f"send-{self._sends}"
        self.session().run(SEND_SCRIPT, [send_id, *arguments])
        return send_id

    def _result(self, send_id: str) -> SendResult:
        def verdict() -> dict[str, Any] | None:
            # None also when a dialog opened while this ran (Marionette then ends it).
            return self.session().run(RESULT_SCRIPT, [send_id])

        try:
            result = wait_until(verdict, SEND_TIMEOUT, "the send's result", interval=0.1)
        except TimeoutError:
            raise AssertionError(
                f"Thunderbird did not finish sending in {SEND_TIMEOUT} s:\n{self.log()[-4000:]}"
            ) from None
        return SendResult(int(result["status"]), str(result["error"]), list(result["dialogs"]))

    def stop(self) -> None:
        """Quit through Marionette, else terminate; never leaves the process behind."""
        if self.marionette is not None:
            self.marionette.quit()
            self.marionette = None
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
