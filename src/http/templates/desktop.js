// The browser desktop: noVNC connected to this server's relay, which reaches the VM.
// Reconnects by itself with backoff when the connection drops (the relay asks the VM for a
// new tunnel each time), so a restarted agent or a network blip needs no new VM request.
import RFB from '/novnc/core/rfb.js';

const screen = document.getElementById('screen');
const statusLine = document.getElementById('status');
const socketPath = screen.dataset.socket;
const password = screen.dataset.password;
const viewOnly = screen.dataset.viewOnly === 'true';

// What the tests read: how often the desktop connected and dropped.
const state = { connects: 0, disconnects: 0, connected: false };
window.lablinkDesktop = state;

let failures = 0;

function say(text) {
  statusLine.textContent = text;
}

function socketUrl() {
  const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${window.location.host}${socketPath}`;
}

function connect() {
  say(failures ? 'Reconnecting to the desktop…' : 'Connecting to the desktop…');
  let rfb;
  try {
    rfb = new RFB(screen, socketUrl(), { credentials: { password }, wsProtocols: ['binary'] });
  } catch (e) {
    retry(`Could not connect: ${e}`);
    return;
  }
  rfb.viewOnly = viewOnly;
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.focusOnClick = !viewOnly;
  rfb.addEventListener('connect', () => {
    failures = 0;
    state.connects += 1;
    state.connected = true;
    say(viewOnly ? 'Connected (view only)' : 'Connected');
  });
  rfb.addEventListener('credentialsrequired', () => rfb.sendCredentials({ password }));
  rfb.addEventListener('securityfailure', (e) => {
    say(`The desktop refused the connection (${e.detail.reason || 'authentication failed'}); trying again…`);
  });
  rfb.addEventListener('disconnect', () => {
    state.connected = false;
    state.disconnects += 1;
    retry('The connection to the desktop dropped; reconnecting…');
  });
}

function retry(message) {
  failures += 1;
  // 0.5 s, 1 s, 2 s, 4 s, then every 8 s: a desktop that is starting is reached soon,
  // a room of browsers does not hammer the server.
  const delay = Math.min(8000, 250 * 2 ** Math.min(failures, 5));
  say(`${message} (in ${Math.round(delay / 100) / 10} s)`);
  window.setTimeout(connect, delay);
}

connect();
