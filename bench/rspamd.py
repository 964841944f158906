"""rspamd as a peer of the benchmark: the C + Lua filter an administrator could
script to approximate ipv6milter's policy.

Debian 12's ``rspamd`` (3.4) runs from a configuration of our own (not
/etc/rspamd): one ``rspamd_proxy`` worker per CPU in milter mode with
``self_scan = yes`` (it scans in the same process, no normal worker behind
it), on a unix socket, reading the bench's Knot.  Only what the policy needs
is loaded:

* SPF: the ``spf`` Lua plugin (``R_SPF_ALLOW`` ...);
* DKIM: the ``dkim`` C module (``filters = "dkim"``; ``R_DKIM_ALLOW`` ...);
* PTR + forward confirmation: a small Lua rule of ours (``bench_iprev.lua``)
  on rspamd's asynchronous resolver, ``IPREV_PASS`` / ``IPREV_FAIL`` /
  ``IPREV_TEMPERROR``;
* the header: ``milter_headers`` with a custom routine that adds one
  ``Authentication-Results`` at the top (milter index 0):
  ``lua_auth_results`` writes the spf= and dkim= results, the routine adds
  iprev=.

The plugin directory is a directory of ours with links to the two Lua
plugins used, so no other plugin (and none of rspamd's rule sets, nor
regexp, fuzzy_check, chartable, dmarc, arc, neural, redis) is ever loaded;
its databases, hyperscan cache, pid file, log and state live under the
bench's work directory.  ``::1`` is a loopback address, which rspamd treats
as local and skips in SPF, DKIM and the headers: ``check_local`` /
``skip_local`` turn that off, as a site would for its IPv6 clients.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

from tests.lab import tree_pids

PLUGINS = Path("/usr/share/rspamd/plugins")
USER = "_rspamd"  # Debian's rspamd user

# PTR + forward confirmation (RFC 8601 section 3: iprev), on rspamd's own
# asynchronous resolver: every PTR name (at most 10) is looked up in the
# client's address family, pass if one of them points back at the client.
IPREV_LUA = r"""
local MAX_NAMES = 10

local function not_found(err)
  -- rspamd's resolver says so for NXDOMAIN and for no data (RFC 8601 3:
  -- no PTR, or no name pointing back, is a fail; anything else temporary).
  return err and (err:find('not found', 1, true) or err:find('no records', 1, true))
end

local function iprev(task)
  local ip = task:get_from_ip()
  if not (ip and ip:is_valid()) then return end
  local addr = ip:to_string()
  local family = (ip:get_version() == 6) and 'aaaa' or 'a'
  local resolver = task:get_resolver()

  local function ptr_cb(_, _, names, err)
    if not names or #names == 0 then
      if not_found(err) then
        task:insert_result('IPREV_FAIL', 1.0, 'no PTR')
      else
        task:insert_result('IPREV_TEMPERROR', 1.0, tostring(err))
      end
      return
    end
    local pending, done, temp = math.min(#names, MAX_NAMES), false, false
    for i = 1, pending do
      local name = names[i]
      resolver:resolve(family, {
        task = task,
        name = name,
        forced = true,
        callback = function(_, _, addrs, ferr)
          pending = pending - 1
          if done then return end
          if addrs then
            for _, a in ipairs(addrs) do
              if a:to_string() == addr then
                done = true
                task:insert_result('IPREV_PASS', 1.0, name)
                return
              end
            end
          elseif not not_found(ferr) then
            temp = true
          end
          if pending == 0 then
            done = true
            task:insert_result(temp and 'IPREV_TEMPERROR' or 'IPREV_FAIL', 1.0, names[1])
          end
        end,
      })
    end
  end

  resolver:resolve_ptr({task = task, name = addr, forced = true, callback = ptr_cb})
end

local id = rspamd_config:register_symbol({
  name = 'BENCH_IPREV',
  type = 'callback',
  callback = iprev,
  score = 0.0,
})
for _, s in ipairs({'IPREV_PASS', 'IPREV_FAIL', 'IPREV_TEMPERROR'}) do
  rspamd_config:register_symbol({name = s, type = 'virtual', parent = id, score = 0.0})
end
"""

# milter_headers' custom routine: lua_auth_results' header (authserv-id from
# Postfix's j macro, then dkim= and spf=) with iprev= added, inserted at index
# 0 (above Postfix's own Received:, where OpenDKIM and ipv6milter put theirs;
# the stock routine's index 1 lands just below it).
AR_ROUTINE = r"""
return function(task, common)
  local ar = require "lua_auth_results"
  local lua_util = require "lua_util"
  local value = ar.gen_auth_results(task, ar.default_settings) or ''
  local ip = task:get_from_ip()
  for _, res in ipairs({'pass', 'fail', 'temperror'}) do
    local s = task:get_symbol('IPREV_' .. res:upper())
    if s and ip then
      local opt = (s[1].options or {})[1]
      local iprev = string.format('iprev=%s policy.iprev="%s"', res, ip:to_string())
      if res == 'pass' and opt then iprev = iprev .. ' (' .. opt .. ')' end
      value = value .. '; ' .. iprev
    end
  end
  local folded = lua_util.fold_header(task, 'Authentication-Results', value, ';')
  return nil, {['Authentication-Results'] = {order = 0, value = folded}}, {}, {}
end
"""


SYMBOLS = (
    "R_SPF_ALLOW", "R_SPF_FAIL", "R_SPF_SOFTFAIL", "R_SPF_NEUTRAL", "R_SPF_DNSFAIL",
    "R_SPF_PERMFAIL", "R_SPF_NA", "R_DKIM_ALLOW", "R_DKIM_REJECT", "R_DKIM_TEMPFAIL",
    "R_DKIM_PERMFAIL", "R_DKIM_NA", "DKIM_TRACE", "IPREV_PASS", "IPREV_FAIL", "IPREV_TEMPERROR",
)


def available() -> bool:
    return shutil.which("rspamd") is not None and (PLUGINS / "spf.lua").exists()


def version() -> str:
    import subprocess

    try:
        p = subprocess.run(["rspamd", "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "?"


def workers_up(pid: int, workers: int) -> bool:
    """Are ``workers`` proxy processes forked?  The main process binds the
    socket before it loads the configuration and forks its workers (seconds
    later, minutes on a first start under load): a listening socket alone is
    not ready."""
    n = 0
    for p in tree_pids(pid):
        try:
            n += b"rspamd_proxy" in Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
    return n >= workers


def configure(home: Path, sock: Path, nameserver: str, workers: int) -> list[str]:
    """Write rspamd's configuration under ``home`` (its state too) and return
    the command that runs it in the foreground on the unix socket ``sock``,
    resolving through ``nameserver`` (``host:port``)."""
    plugins, db = home / "plugins", home / "db"
    for d in (home, plugins, db):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("spf.lua", "milter_headers.lua"):
        link = plugins / name
        if not link.exists():
            link.symlink_to(PLUGINS / name)
    (home / "bench_iprev.lua").write_text(IPREV_LUA)
    routine = AR_ROUTINE.strip("\n")
    symbols = "\n".join(f"        {name} {{ score = 0.0; }}" for name in SYMBOLS)
    conf = home / "rspamd.conf"
    conf.write_text(f"""\
# rspamd under benchmark: SPF, DKIM, PTR + forward, one header; nothing else.
lua = "{home / 'bench_iprev.lua'}";

options {{
    filters = "dkim";            # C modules: DKIM only (no regexp, chartable, fuzzy_check)
    pidfile = "{home / 'rspamd.pid'}";
    cache_file = "{db / 'symbols.cache'}";
    hs_cache_dir = "{db}/";
    tempdir = "{home}";
    check_local = true;          # [::1] is our client, not a local relay
    local_addrs = [];
    dns {{
        nameserver = ["{nameserver}"];
        timeout = 2s;
        retransmits = 2;
    }}
}}

logging {{
    type = "file";
    filename = "{home / 'rspamd.log'}";
    # One line per message (the task summary), as ipv6milter's one decision
    # line at its default LogLevel; Debian's "info" adds five more a message.
    level = "notice";
}}

modules {{
    path = "{plugins}";
}}

actions {{
    reject = 1000;
    add_header = 500;
}}

# The symbols the three checks insert, known to the metric (score 0: the
# header says what happened; nothing here rejects).
group "bench" {{
    symbols {{
{symbols}
    }}
}}

spf {{
    check_local = true;
    spf_cache_size = 2k;
    spf_cache_expire = 1d;
}}

dkim {{
    check_local = true;
    dkim_cache_size = 2k;
    dkim_cache_expire = 1d;
    skip_multi = false;
}}

milter_headers {{
    skip_local = false;
    skip_authenticated = false;
    remove_upstream_spam_flag = false;
    use = ["bench-authentication-results"];
    custom {{
        bench-authentication-results = <<EOD
{routine}
EOD;
    }}
}}

worker "rspamd_proxy" {{
    bind_socket = "{sock} mode=0666";
    milter = yes;
    # self_scan is a property of the upstream: the proxy scans in-process.
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
    count = {workers};
    timeout = 120s;
    discard_on_reject = false;
    quarantine_on_reject = false;
}}
""")
    uid = pwd.getpwnam(USER)
    for d in (home, plugins, db):
        os.chown(d, uid.pw_uid, uid.pw_gid)
    return ["rspamd", "-f", "-c", str(conf), "-u", USER, "-g", USER,
            "--var", f"DBDIR={db}", "--var", f"RUNDIR={home}", "--var", f"LOGDIR={home}"]
