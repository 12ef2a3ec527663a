#!/usr/bin/env bash
# A runnable tour of the chat-system HTTP API: every endpoint is called once or more,
# each request is printed as the curl command that reproduces it, followed by an
# excerpt of the answer, and every answer is checked against the contract.
#
#   examples/walkthrough.sh                                # server on 127.0.0.1:3000
#   BASE_URL=http://host:8080 examples/walkthrough.sh
#
# Needs only bash, curl and python3. Exit status: 0 when every answer was right,
# 1 at the first wrong answer (with the request and the answer that broke the rule),
# 2 when a tool is missing.
#
# Optional environment:
#   BASE_URL         the server (default http://127.0.0.1:3000)
#   ADMIN_API_KEY    sent as a bearer token to GET /applications, for servers that set it
#   WAIT_TIMEOUT     seconds to wait for persistence and search indexing (default 20)
#   COUNTS_TIMEOUT   seconds to wait for chats_count / messages_count (default 30;
#                    the server refreshes them every COUNTS_SYNC_INTERVAL, 10 s by default)
#   NO_COLOR         set to disable colours
#
# Every run creates two new applications with unique names, so it can be repeated
# against the same server as often as you like.
set -euo pipefail

BASE_URL=${BASE_URL:-http://127.0.0.1:3000}
BASE_URL=${BASE_URL%/}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-20}
COUNTS_TIMEOUT=${COUNTS_TIMEOUT:-30}

for tool in curl python3; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "walkthrough: '$tool' is required but not installed" >&2
    exit 2
  }
done

# The interpreter itself, not a version-manager shim in front of it, without site
# packages (only the standard library is used): it runs a few hundred times.
PY=("$(python3 -c 'import sys; print(sys.executable or "python3")')" -I -S)

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
  BOLD=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' CYAN=$'\e[36m' OFF=$'\e[0m'
else
  BOLD='' DIM='' RED='' GREEN='' CYAN='' OFF=''
fi

WT_WORK=$("${PY[@]}" -c 'import tempfile; print(tempfile.mkdtemp(prefix="walkthrough."))')
export WT_WORK
trap '"${PY[@]}" -c "import shutil, sys; shutil.rmtree(sys.argv[1], True)" "$WT_WORK"' EXIT

# ---------------------------------------------------------------------------------------
# The checker: reads the last answer (status, headers, body) from $WT_WORK and evaluates
# a Python expression against it. Names available to expressions:
#   status, h (headers, lower-case names), j (the parsed JSON body or None), text, E (env)
#   app(x) chat(x) msg(x)   x has the resource's shape (fields, types, RFC 3339 UTC times)
#   problem(code)           the answer is an RFC 9457 problem with that status
#   next_link()             the path of the Link rel="next" target, or None
#   nums(list)              the `number` of each item
cat >"$WT_WORK/check.py" <<'PY'
import json, os, re, sys

W = os.environ["WT_WORK"]
E = os.environ


class Bad(Exception):
    pass


def load():
    try:
        with open(os.path.join(W, "status")) as f:
            status = int(f.read().strip() or 0)
    except (OSError, ValueError):
        status = 0
    headers, status_line = {}, ""
    try:
        with open(os.path.join(W, "headers"), encoding="latin-1") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.startswith("HTTP/"):
                    headers, status_line = {}, line  # keep the last block only
                elif ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
    except OSError:
        pass
    try:
        with open(os.path.join(W, "body"), "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    return status, status_line, headers, text, body


status, status_line, h, text, j = load()

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:?00)$")


def no_id(x, where="body"):
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "id":
                raise Bad("%s has a field named `id` (no internal id may be exposed)" % where)
            no_id(v, where)
    elif isinstance(x, list):
        for v in x:
            no_id(v, where)
    return True


def shape(x, kind, fields):
    if not isinstance(x, dict):
        raise Bad("expected a %s object, got %s" % (kind, json.dumps(x)[:200]))
    missing = [f for f in fields if f not in x]
    if missing:
        raise Bad("%s lacks %s: %s" % (kind, ", ".join(missing), json.dumps(x)[:200]))
    for f, t in fields.items():
        v = x[f]
        ok = {
            "str": isinstance(v, str),
            "str?": v is None or isinstance(v, str),
            "int": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "pos": isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "ts": isinstance(v, str) and bool(TS.match(v)),
        }[t]
        if not ok:
            raise Bad("%s.%s = %s is not a valid %s" % (kind, f, json.dumps(v), t))
    no_id(x, kind)
    return True


def app(x):
    shape(x, "application", {"token": "str", "name": "str", "chats_count": "int",
                             "created_at": "ts", "updated_at": "ts"})
    # 128 bits or more of randomness, URL-safe: 22+ characters of base64url.
    if not re.match(r"^[A-Za-z0-9_-]{22,}$", x["token"]):
        raise Bad("token %r is not URL-safe text of at least 128 bits" % x["token"])
    return True


def chat(x):
    return shape(x, "chat", {"number": "pos", "title": "str?", "messages_count": "int",
                             "created_at": "ts", "updated_at": "ts"})


def msg(x):
    return shape(x, "message", {"number": "pos", "chat_number": "pos", "body": "str",
                                "created_at": "ts", "updated_at": "ts"})


def content_type():
    return h.get("content-type", "").split(";")[0].strip().lower()


def problem(code):
    if status != code:
        raise Bad("expected HTTP %d, got %d" % (code, status))
    if content_type() != "application/problem+json":
        raise Bad("Content-Type is %r, not application/problem+json" % h.get("content-type"))
    if not isinstance(j, dict):
        raise Bad("the problem body is not a JSON object")
    for f, t in (("type", str), ("title", str), ("status", int), ("detail", str)):
        if not isinstance(j.get(f), t):
            raise Bad("the problem body lacks a %s `%s`" % (t.__name__, f))
    if j["status"] != code:
        raise Bad("the problem's status is %r, not %d" % (j["status"], code))
    return True


def next_link():
    link = h.get("link")
    if not link:
        return None
    for part in link.split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)$', part)
        if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
            target = m.group(1)
            base = E.get("BASE_URL", "")
            if target.startswith(base) and base:
                target = target[len(base):]
            elif re.match(r"^https?://", target):
                target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
            return target
    return None


def nums(x):
    return [m["number"] for m in x]


def excerpt(full=False):
    out = ["-> %s" % (status_line or "HTTP %d" % status)]
    for k in ("location", "link", "allow", "content-type"):
        if k in h and (k != "content-type" or content_type() != "application/json"):
            out.append("   %s: %s" % (k.title(), h[k]))
    limit = 100000 if full else 280
    if j is not None:
        s = json.dumps(j, ensure_ascii=False, separators=(",", ":"))
        if len(s) > limit and isinstance(j, list) and j:
            s = "[" + json.dumps(j[0], ensure_ascii=False, separators=(",", ":")) + ",...]"
        if len(s) > limit:
            s = s[:limit] + "..."
        if isinstance(j, list):
            s += "   (%d item%s)" % (len(j), "" if len(j) == 1 else "s")
        out.append("   " + s)
    elif text:
        lines = text.splitlines()
        shown = lines if full else lines[:4]
        out.extend("   " + l[:limit] for l in shown)
        if len(shown) < len(lines):
            out.append("   ... (%d more lines)" % (len(lines) - len(shown)))
    return "\n".join(out)


def ev(expr):
    return eval(expr, globals())


mode = sys.argv[1]
if mode == "show":
    print(excerpt(full=len(sys.argv) > 2))
elif mode == "get":
    v = ev(sys.argv[2])
    print(v if isinstance(v, str) else json.dumps(v))
elif mode == "expect":
    try:
        ok = ev(sys.argv[2])
    except Bad as e:
        print(e)
        sys.exit(1)
    except Exception as e:  # a KeyError on a wrong body, ...
        print("%s: %s" % (type(e).__name__, e))
        sys.exit(1)
    if not ok:
        print("not true: %s" % sys.argv[2])
        sys.exit(1)
PY

# ---------------------------------------------------------------------------------------
# Helpers.

STEP=0
TITLE=''
LAST_REQUEST=''
export BASE_URL

step() {
  STEP=$((STEP + 1))
  TITLE=$1
  printf '\n%s%d. %s%s\n' "$BOLD" "$STEP" "$1" "$OFF"
  if [ $# -ge 2 ]; then printf '%s   %s%s\n' "$DIM" "$2" "$OFF"; fi
}

fail() {
  printf '\n%sFAIL%s in step %d (%s): %s\n' "$RED$BOLD" "$OFF" "$STEP" "$TITLE" "$1" >&2
  if [ -n "$LAST_REQUEST" ]; then
    printf 'The request was:\n  $ %s\nThe answer was:\n' "$LAST_REQUEST" >&2
    "${PY[@]}" "$WT_WORK/check.py" show full >&2 || true
  fi
  exit 1
}

shquote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

pause() { "${PY[@]}" -c 'import sys, time; time.sleep(float(sys.argv[1]))' "$1"; }

now_ms() {
  if [ -n "${EPOCHREALTIME:-}" ]; then
    local t=${EPOCHREALTIME/[.,]/}
    echo $((10#$t / 1000))
  else
    "${PY[@]}" -c 'import time; print(int(time.time() * 1000))'
  fi
}

# request METHOD PATH [BODY [CONTENT_TYPE]]
# Sends the request (with a JSON body when BODY is given, even an empty one), prints it
# as a curl command and the answer's excerpt (unless QUIET=1), and leaves the answer in
# $WT_WORK for `expect` and `value`.
request() {
  local method=$1 path=$2 url=$BASE_URL$2 code
  local args=(-sS --max-time 20 -o "$WT_WORK/body" -D "$WT_WORK/headers" -w '%{http_code}')
  local shown='curl -si'
  if [ "$method" != GET ]; then
    args+=(-X "$method")
    shown+=" -X $method"
  fi
  args+=("$url")
  shown+=" $(shquote "$url")"
  if [ -n "${ADMIN_API_KEY:-}" ] && [[ $path == /applications || $path == /applications\?* ]]; then
    args+=(-H "Authorization: Bearer $ADMIN_API_KEY")
    shown+=' -H "Authorization: Bearer $ADMIN_API_KEY"'
  fi
  if [ $# -ge 3 ]; then
    local ctype=${4:-application/json}
    args+=(-H "Content-Type: $ctype" --data-binary "$3")
    shown+=" -H $(shquote "Content-Type: $ctype") -d $(shquote "$3")"
  fi
  LAST_REQUEST=$shown
  [ "${QUIET:-0}" = 1 ] || printf '%s$ %s%s\n' "$CYAN" "$shown" "$OFF"
  : >"$WT_WORK/body"
  : >"$WT_WORK/headers"
  if ! code=$(curl "${args[@]}" 2>"$WT_WORK/curl.err"); then
    LAST_REQUEST=''
    fail "no answer from $BASE_URL: $(<"$WT_WORK/curl.err")
Is the server running? (scripts/run, or docker compose up --build; set BASE_URL if it listens elsewhere)"
  fi
  printf '%s' "$code" >"$WT_WORK/status"
  [ "${QUIET:-0}" = 1 ] || show
}

show() { printf '%s%s%s\n' "$DIM" "$("${PY[@]}" "$WT_WORK/check.py" show)" "$OFF"; }

# expect EXPR WHAT: fails the walkthrough unless EXPR holds for the last answer.
expect() {
  local why
  if ! why=$("${PY[@]}" "$WT_WORK/check.py" expect "$1"); then
    fail "expected: $2${why:+ ($why)}"
  fi
  printf '   %s✓%s %s\n' "$GREEN" "$OFF" "$2"
}

# value EXPR: prints EXPR evaluated against the last answer.
value() { "${PY[@]}" "$WT_WORK/check.py" get "$1"; }

# poll SECONDS EXPR WHAT METHOD PATH: repeats a GET until EXPR holds for its answer, for
# at most SECONDS, then prints the answer. For what the server does asynchronously.
poll() {
  local limit=$1 expr=$2 what=$3 tries=0 started deadline
  shift 3
  started=$(now_ms)
  deadline=$((SECONDS + limit))
  while :; do
    tries=$((tries + 1))
    QUIET=1 request "$@"
    if [ $tries = 1 ]; then
      printf '%s$ %s%s   %s# repeated until it holds, at most %ss%s\n' \
        "$CYAN" "$LAST_REQUEST" "$OFF" "$DIM" "$limit" "$OFF"
    fi
    if "${PY[@]}" "$WT_WORK/check.py" expect "$expr" >/dev/null 2>&1; then break; fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      expect "$expr" "$what (still not true after ${limit}s and $tries attempts)"
    fi
    pause 0.25
  done
  show
  local ms=$(($(now_ms) - started))
  expect "$expr" "$what (after $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s, $tries request$([ $tries = 1 ] || echo s))"
}

json_str() { "${PY[@]}" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
urlencode() { "${PY[@]}" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }

START_MS=$(now_ms)
RUN_ID="$(TZ=UTC0 printf '%(%Y%m%dT%H%M%SZ)T' -1)-$$-$RANDOM"
APP_NAME="walkthrough $RUN_ID"
export APP_NAME

printf '%sChat system API walkthrough%s against %s\n' "$BOLD" "$OFF" "$BASE_URL"
printf '%sEach step shows the request as a curl command, then an excerpt of the answer and what was checked.%s\n' "$DIM" "$OFF"

# ---------------------------------------------------------------------------------------
step 'Is the service alive and ready?' \
  '/healthz answers while the process lives; /readyz only when MySQL, Redis and search answer.'
request GET /healthz
expect 'status == 200' '/healthz is 200'
request GET /readyz
expect 'status == 200' '/readyz is 200 (a 503 would name the dependency that is down)'
expect 'j.get("status") == "ready"' 'every dependency answers'

# ---------------------------------------------------------------------------------------
step 'Register an application' \
  'The server generates the token; the name is ours. Chats and messages live under the token.'
request POST /applications "{\"name\":$(json_str "$APP_NAME")}"
expect 'status == 201' '201 Created'
expect 'app(j)' 'the body is an Application (token, name, chats_count, created_at, updated_at; no id)'
expect 'j["name"] == E["APP_NAME"] and j["chats_count"] == 0' 'the name is ours, no chats yet'
TOKEN=$(value 'j["token"]')
export TOKEN
expect 'h.get("location") in ("/applications/" + E["TOKEN"], E["BASE_URL"] + "/applications/" + E["TOKEN"])' \
  'Location points at the new application'
APP=/applications/$TOKEN

step 'Fetch it by its token'
request GET "$APP"
expect 'status == 200 and app(j) and j["token"] == E["TOKEN"] and j["name"] == E["APP_NAME"]' \
  '200 with the same application'

step 'A second application: fields the client may not set are ignored' \
  'token, chats_count, id and unknown fields in the request are ignored; the server chooses.'
request POST /applications \
  "{\"name\":$(json_str "$APP_NAME (second)"),\"token\":\"mine\",\"chats_count\":7,\"id\":1,\"colour\":\"blue\"}"
expect 'status == 201 and app(j)' '201 Created'
expect 'j["token"] not in ("mine", E["TOKEN"]) and j["chats_count"] == 0 and "colour" not in j' \
  'the server chose a new token and ignored chats_count, id and colour'
TOKEN2=$(value 'j["token"]')
export TOKEN2
APP2=/applications/$TOKEN2

# ---------------------------------------------------------------------------------------
step 'List applications, one per page' \
  'Pages are plain JSON arrays; when more exist, the Link header (RFC 8288) names the next page.'
request GET '/applications?limit=1'
if [ "$(value 'status')" = 401 ]; then
  fail 'GET /applications answered 401: this server sets ADMIN_API_KEY, so export the same ADMIN_API_KEY for the walkthrough'
fi
if [ "$(value 'status')" = 403 ]; then
  # The default: no ADMIN_API_KEY on the server, so the token list is closed.
  expect 'status == 403 and j["type"] == "/problems/listing-disabled"' \
    'listing is disabled on this server (no ADMIN_API_KEY): a 403 problem, no tokens'
else
  expect 'status == 200 and isinstance(j, list) and len(j) == 1 and app(j[0])' 'a page of exactly one application'
  expect 'next_link() is not None' 'Link: <...>; rel="next" (there are at least two applications)'
  FIRST=$(value 'j[0]["token"]')
  export FIRST
  NEXT=$(value 'next_link()')

  step 'Follow the Link header to the next page'
  request GET "$NEXT"
  expect 'status == 200 and isinstance(j, list) and len(j) == 1 and app(j[0])' 'again one application'
  expect 'j[0]["token"] != E["FIRST"]' 'a different one than on the first page'

  step 'Walk the whole list (1000 per page) until our two applications show up'
  path='/applications?limit=1000'
  pages=0
  seen=0
  while :; do
    pages=$((pages + 1))
    QUIET=$([ $pages = 1 ] && echo 0 || echo 1) request GET "$path"
    expect 'status == 200 and isinstance(j, list) and len(j) <= 1000 and all(app(a) for a in j)' \
      "page $pages: up to 1000 applications"
    seen=$((seen + $(value 'len(j)')))
    if [ "$(value 'E["TOKEN"] in [a["token"] for a in j] and E["TOKEN2"] in [a["token"] for a in j]')" = true ]; then
      break
    fi
    path=$(value 'next_link() or ""')
    [ -n "$path" ] || fail 'the last page was reached without finding both new applications'
    [ $pages -lt 500 ] || fail 'gave up after 500 pages'
  done
  expect 'True' "both found after $pages page(s), $seen application(s)"
fi

# ---------------------------------------------------------------------------------------
step 'Rename the application with PATCH' 'PATCH and PUT both replace the fields given.'
request PATCH "$APP" "{\"name\":$(json_str "$APP_NAME (patched)")}"
expect 'status == 200 and app(j) and j["name"] == E["APP_NAME"] + " (patched)" and j["token"] == E["TOKEN"]' \
  '200, renamed, same token'

step 'Rename it again with PUT'
request PUT "$APP" "{\"name\":$(json_str "$APP_NAME")}"
expect 'status == 200 and app(j) and j["name"] == E["APP_NAME"]' '200, renamed back'
request GET "$APP"
expect 'status == 200 and j["name"] == E["APP_NAME"]' 'a GET sees the new name'

# ---------------------------------------------------------------------------------------
step 'Create a chat with a title' \
  'Its number is allocated at once (1, 2, 3, ... per application); it reaches MySQL a moment later.'
request POST "$APP/chats" '{"title":"General"}'
expect 'status == 201 and chat(j)' '201 Created, a Chat'
expect 'j["number"] == 1 and j["title"] == "General" and j["messages_count"] == 0' 'number 1, titled General'
expect 'h.get("location", "").endswith(E["TOKEN"] + "/chats/1")' 'Location points at chat 1'
request GET "$APP/chats/1"
expect 'status == 200 and chat(j) and j["number"] == 1 and j["title"] == "General"' \
  'readable right after its 201, persisted or not'

step 'Create a chat without a title (empty body)'
request POST "$APP/chats"
expect 'status == 201 and chat(j) and j["number"] == 2 and j["title"] is None' '201 Created, number 2, title null'
expect 'h.get("location", "").endswith(E["TOKEN"] + "/chats/2")' 'Location points at chat 2'
request GET "$APP/chats/2"
expect 'status == 200 and chat(j) and j["number"] == 2' 'readable right after its 201'

step 'Numbers are per application' "The second application's first chat is number 1 too."
request POST "$APP2/chats" '{}'
expect 'status == 201 and chat(j) and j["number"] == 1' 'number 1 in the other application'

step 'List the chats' \
  'Lists read MySQL, where creates arrive asynchronously: repeat until both chats are there.'
poll "$WAIT_TIMEOUT" 'status == 200 and all(chat(c) for c in j) and nums(j) == [1, 2]' \
  'both chats, ascending number' GET "$APP/chats"
expect '[c["title"] for c in j] == ["General", None]' 'with their titles'

step 'List the chats one per page, following Link'
request GET "$APP/chats?limit=1"
expect 'status == 200 and nums(j) == [1] and next_link() is not None' 'chat 1, and a Link to the next page'
request GET "$(value 'next_link()')"
expect 'status == 200 and nums(j) == [2] and next_link() is None' 'chat 2, and no Link: the last page'

step 'Retitle chat 1 with PATCH, chat 2 with PUT'
request PATCH "$APP/chats/1" '{"title":"General (renamed)"}'
expect 'status == 200 and chat(j) and j["number"] == 1 and j["title"] == "General (renamed)"' '200, retitled'
request PUT "$APP/chats/2" '{"title":"Random","number":99}'
expect 'status == 200 and chat(j) and j["number"] == 2 and j["title"] == "Random"' \
  '200, retitled; the number in the body is ignored'
request GET "$APP/chats/2"
expect 'status == 200 and j["title"] == "Random"' 'a GET sees the new title'
poll "$WAIT_TIMEOUT" 'status == 200 and [c["title"] for c in j] == ["General (renamed)", "Random"]' \
  'the list shows both new titles once persisted' GET "$APP/chats"

# ---------------------------------------------------------------------------------------
step 'Post messages to chat 1' 'Numbers are allocated at once: 1, 2, 3, ... per chat.'
n=0
for body in 'Hello World' 'hello there' 'Welcome to the new world'; do
  n=$((n + 1))
  export N=$n BODY=$body
  request POST "$APP/chats/1/messages" "{\"body\":$(json_str "$body")}"
  expect 'status == 201 and msg(j) and j["number"] == int(E["N"]) and j["chat_number"] == 1 and j["body"] == E["BODY"]' \
    "201 Created, message number $n"
  expect 'h.get("location", "").endswith(E["TOKEN"] + "/chats/1/messages/" + E["N"])' \
    "Location points at message $n"
  request GET "$APP/chats/1/messages/$n"
  expect 'status == 200 and msg(j) and j["number"] == int(E["N"]) and j["body"] == E["BODY"]' \
    'readable right after its 201'
done

step 'Post a message to chat 2, and edit it at once' \
  'Message numbers are per chat: this one is number 1 again. An edit may arrive before the create is persisted; the last accepted write wins.'
request POST "$APP/chats/2/messages" '{"body":"Hello from the other chat"}'
expect 'status == 201 and msg(j) and j["number"] == 1 and j["chat_number"] == 2' '201 Created, message 1 of chat 2'
request PATCH "$APP/chats/2/messages/1" '{"body":"Hello again from the other chat"}'
expect 'status == 200 and msg(j) and j["body"] == "Hello again from the other chat"' '200, edited right after its 201'
poll "$WAIT_TIMEOUT" 'status == 200 and [(m["number"], m["body"]) for m in j] == [(1, "Hello again from the other chat")]' \
  'once persisted, chat 2 holds the edited message' GET "$APP/chats/2/messages"

step 'List the messages of chat 1' 'A message is listed as soon as its create is answered, persisted or not.'
request GET "$APP/chats/1/messages"
expect 'status == 200 and all(msg(m) for m in j) and nums(j) == [1, 2, 3]' \
  'messages 1, 2, 3 in ascending order' 
expect '[m["body"] for m in j] == ["Hello World", "hello there", "Welcome to the new world"] and all(m["chat_number"] == 1 for m in j)' \
  'with their bodies, all of chat 1'

step 'List them two per page, following Link'
request GET "$APP/chats/1/messages?limit=2"
expect 'status == 200 and nums(j) == [1, 2] and next_link() is not None' 'messages 1 and 2, and a Link'
request GET "$(value 'next_link()')"
expect 'status == 200 and nums(j) == [3] and next_link() is None' 'message 3, the last page'

step 'Newest first, as a chat screen opens' 'order=desc pages back from the latest message with before.'
request GET "$APP/chats/1/messages?order=desc&limit=2"
expect 'status == 200 and nums(j) == [3, 2] and next_link() is not None' 'messages 3 and 2, and a Link'
request GET "$(value 'next_link()')"
expect 'status == 200 and nums(j) == [1] and next_link() is None' 'message 1, the oldest page'


# ---------------------------------------------------------------------------------------
SEARCH=$APP/chats/1/messages/search
step 'Search chat 1: partial and case-insensitive' \
  'Every whitespace-separated term must occur in the body as a substring, in any case. Indexing is asynchronous: repeat until it is there.'
poll "$WAIT_TIMEOUT" 'status == 200 and all(msg(m) for m in j) and nums(j) == [1, 2]' \
  'q=ell finds "Hello World" and "hello there" (not chat 2'"'"'s "Hello again from the other chat")' \
  GET "$SEARCH?q=ell"
poll "$WAIT_TIMEOUT" 'status == 200 and nums(j) == [1, 3]' 'q=WOR finds "Hello World" and "Welcome to the new world"' \
  GET "$SEARCH?q=WOR"

step 'Search with two terms: both must occur'
request GET "$SEARCH?q=$(urlencode 'hel wor')"
expect 'status == 200 and nums(j) == [1]' 'q="hel wor" finds only "Hello World" ("hello there" lacks wor, "Welcome..." lacks hel)'
request GET "$SEARCH?q=ell&limit=1"
expect 'status == 200 and nums(j) == [1] and next_link() is not None' 'search pages like lists: limit=1 gives a Link'
request GET "$(value 'next_link()')"
expect 'status == 200 and nums(j) == [2] and next_link() is None' 'the next page has the other match'

# ---------------------------------------------------------------------------------------
step 'Edit message 3 with PATCH, message 2 with PUT'
request PATCH "$APP/chats/1/messages/3" '{"body":"Welcome to the new world, hello!"}'
expect 'status == 200 and msg(j) and j["number"] == 3 and j["body"] == "Welcome to the new world, hello!"' '200, edited'
request PUT "$APP/chats/1/messages/2" '{"body":"Goodbye there"}'
expect 'status == 200 and msg(j) and j["number"] == 2 and j["body"] == "Goodbye there"' '200, edited'
request GET "$APP/chats/1/messages/2"
expect 'status == 200 and j["body"] == "Goodbye there"' 'a GET sees the new body'
poll "$WAIT_TIMEOUT" 'status == 200 and [m["body"] for m in j] == ["Hello World", "Goodbye there", "Welcome to the new world, hello!"]' \
  'the list shows the new bodies once persisted' GET "$APP/chats/1/messages"

step 'Search sees the edits' 'An updated body replaces the old one in the index.'
poll "$WAIT_TIMEOUT" 'status == 200 and nums(j) == [1, 3]' 'q="hel wor" now also finds message 3' \
  GET "$SEARCH?q=$(urlencode 'hel wor')"
poll "$WAIT_TIMEOUT" 'status == 200 and nums(j) == []' 'q="hello there" no longer finds message 2 (its old body)' \
  GET "$SEARCH?q=$(urlencode 'hello there')"
request GET "$SEARCH?q=goodbye"
expect 'status == 200 and nums(j) == [2]' 'q=goodbye finds its new body'

# ---------------------------------------------------------------------------------------
step 'Counts catch up' \
  "chats_count and messages_count are stored columns refreshed every COUNTS_SYNC_INTERVAL (10 s by default): repeat for up to ${COUNTS_TIMEOUT}s."
poll "$COUNTS_TIMEOUT" 'status == 200 and j["chats_count"] == 2' 'the application has chats_count 2' GET "$APP"
poll "$COUNTS_TIMEOUT" 'status == 200 and j["messages_count"] == 3' 'chat 1 has messages_count 3' GET "$APP/chats/1"
poll "$COUNTS_TIMEOUT" 'status == 200 and j["messages_count"] == 1' 'chat 2 has messages_count 1' GET "$APP/chats/2"
poll "$COUNTS_TIMEOUT" 'status == 200 and j["chats_count"] == 1' 'the second application has chats_count 1' GET "$APP2"

# ---------------------------------------------------------------------------------------
step 'Errors are RFC 9457 problem documents' \
  'Content-Type: application/problem+json, with type, title, status and detail.'
request POST /applications '{"name": "oops"'
expect 'problem(400)' '400 for malformed JSON'
request POST /applications '{"name": 42}'
expect 'problem(400)' '400 for a wrong JSON type'
request GET "$APP/chats?limit=0"
expect 'problem(400)' '400 for a bad limit'
request GET "$APP/chats/0"
expect 'problem(400)' '400 for a chat number that is not a positive integer'
request GET "$SEARCH?q=$(urlencode '   ')"
expect 'problem(400)' '400 for a blank search'
request GET /applications/no-such-token-0000000000000000
expect 'problem(404)' '404 for an unknown token'
request GET "$APP/chats/999999"
expect 'problem(404)' '404 for an unknown chat'
request GET "$APP/chats/1/messages/999999"
expect 'problem(404)' '404 for an unknown message'
request GET /no-such-route
expect 'problem(404)' '404 for an unknown route'
request DELETE "$APP"
expect 'problem(405)' '405 for a method the path does not allow'
expect '"allow" in h' 'with an Allow header listing the methods it does'
request POST /applications "{\"name\":$(json_str "$APP_NAME (never created)")}" text/plain
expect 'problem(415)' '415 for a body that is not application/json'
request POST /applications '{"name":""}'
expect 'problem(422)' '422 for an empty name'
expect 'any(e.get("field") == "name" for e in j.get("errors", []))' '`errors` names the field'
request POST "$APP/chats/1/messages" '{"body":""}'
expect 'problem(422)' '422 for an empty message body'

# ---------------------------------------------------------------------------------------
step 'Follow chat 1 live' \
  'Server-Sent Events: new and edited messages as they are accepted, on any API process (curl -N).'
events_file=$(mktemp)
curl -sN --max-time 5 "$BASE_URL$APP/chats/1/messages/events" >"$events_file" &
events_pid=$!
sleep 0.5
request POST "$APP/chats/1/messages" '{"body":"Live hello"}'
expect 'status == 201 and msg(j)' '201 Created'
for _ in $(seq 1 40); do grep -q 'Live hello' "$events_file" && break; sleep 0.1; done
kill "$events_pid" 2>/dev/null || true
wait "$events_pid" 2>/dev/null || true
if grep -q '^event: message.created' "$events_file" && grep -q '"body":"Live hello"' "$events_file"; then
  printf '  ok: the subscriber got event: message.created for the new message\n'
else
  printf '  FAILED: no message.created event for the new message; the stream held:\n' >&2
  cat "$events_file" >&2
  exit 1
fi
rm -f "$events_file"

# ---------------------------------------------------------------------------------------
step 'Metrics, in the Prometheus text format'
request GET /metrics
expect 'status == 200 and content_type() == "text/plain"' '200, text/plain'
expect '"http_requests_total" in text and "# TYPE" in text' 'includes http_requests_total'

step 'The OpenAPI document describes every endpoint'
request GET /openapi.json
expect 'status == 200 and isinstance(j, dict) and str(j.get("openapi", "")).startswith("3.")' 'an OpenAPI 3 document'
expect '(lambda have: [p + " " + m for p, ms in {
    "/applications": "get post", "/applications/{}": "get patch put",
    "/applications/{}/chats": "get post", "/applications/{}/chats/{}": "get patch put",
    "/applications/{}/chats/{}/messages": "get post",
    "/applications/{}/chats/{}/messages/{}": "get patch put",
    "/applications/{}/chats/{}/messages/search": "get",
    "/applications/{}/chats/{}/messages/events": "get",
    "/healthz": "get", "/readyz": "get", "/metrics": "get", "/openapi.json": "get",
  }.items() for m in ms.split() if m not in have.get(p, {})] == [])(
  {re.sub(r"\{[^}]*\}", "{}", p): v for p, v in j.get("paths", {}).items()})' \
  'it lists every path and method of this walkthrough'

ms=$(($(now_ms) - START_MS))
printf '\n%sAll %d steps passed%s in %d.%d s. The applications this run created:\n  %s\n  %s\n' \
  "$GREEN$BOLD" "$STEP" "$OFF" $((ms / 1000)) $((ms % 1000 / 100)) "$BASE_URL$APP" "$BASE_URL$APP2"
