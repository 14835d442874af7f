"""POST a body to the admission webhook over HTTPS and apply the patch it returns.

usage: admission.py URL CA_PEM BODY_FILE

Verifies the server's certificate against CA_PEM (as the API server does with the webhook's
caBundle), POSTs BODY_FILE as application/json, and prints one JSON object:
  {"status": HTTP status, "text": the body when it is not JSON, "review": the response review,
   "patched": the request's pod with the returned JSONPatch applied (python's jsonpatch, an
   implementation independent of Muon's), or null when there is no patch}
"""
import base64
import json
import ssl
import sys
import urllib.error
import urllib.request

import jsonpatch


def main():
    url, ca, body_file = sys.argv[1:4]
    with open(body_file, "rb") as f:
        body = f.read()
    ctx = ssl.create_default_context(cafile=ca)
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    out = {"status": status, "text": None, "review": None, "patched": None}
    try:
        out["review"] = json.loads(raw)
    except ValueError:
        out["text"] = raw.decode("utf-8", "replace")
        print(json.dumps(out))
        return
    response = out["review"].get("response") or {}
    if "patch" in response:
        if response.get("patchType") != "JSONPatch":
            raise SystemExit("a patch without patchType JSONPatch: %r" % response)
        ops = json.loads(base64.b64decode(response["patch"]))
        pod = json.loads(body)["request"]["object"]
        out["patched"] = jsonpatch.JsonPatch(ops).apply(pod)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
