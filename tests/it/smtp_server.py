"""A real SMTP server for the email sink's integration tests (tests/it/email.rs).

aiosmtpd speaks SMTP (EHLO, STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA) as
RFC 5321 says; this script only adds what the tests need around it:

* a script of failures, read from DIR/script at each RCPT and DATA: its
  first line naming that phase (``RCPT 550 5.1.1 ...`` or ``DATA 451 ...``)
  is taken out of the file and answered instead of success;
* every message that reached the end of DATA, accepted or refused there,
  parsed with Python's own ``email`` package (an independent MIME/RFC 2047
  decoder) and written to DIR/accepted/NNNN.json or DIR/refused/NNNN.json,
  with the envelope, whether the session was encrypted and who logged in.

Usage: smtp_server.py --port PORT --dir DIR [--tls none|starttls|tls
       --cert PEM --key PEM] [--auth USER:PASSWORD]
Prints "ready" on stdout once it accepts connections; runs until killed.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def take_scripted(directory, phase):
    """The first scripted answer for `phase`, removed from the script."""
    path = os.path.join(directory, "script")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return None
    for i, line in enumerate(lines):
        if line.startswith(phase + " "):
            del lines[i]
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
            os.replace(path + ".tmp", path)
            return line[len(phase) + 1:]
    return None


def body_of(message, subtype):
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_type() != "text/" + subtype:
        return None
    return part.get_content()


class Handler:
    def __init__(self, directory, implicit_tls):
        self.directory = directory
        self.implicit_tls = implicit_tls
        self.count = 0
        for sub in ("accepted", "refused"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        scripted = take_scripted(self.directory, "RCPT")
        if scripted:
            return scripted
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        scripted = take_scripted(self.directory, "DATA")
        raw = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": self.implicit_tls or session.ssl is not None,
            "auth_user": session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None,
            # The message as it crossed the wire (headers must be 7-bit).
            "raw": raw.decode("ascii", errors="backslashreplace"),
            # And as a mail client reads it: RFC 2047 and transfer encodings undone.
            "message_id": message["Message-ID"],
            "subject": message["Subject"],
            "from": message["From"],
            "from_name": message["From"].addresses[0].display_name,
            "from_addr": message["From"].addresses[0].addr_spec,
            "to": [
                {"name": a.display_name, "addr": a.addr_spec}
                for a in message["To"].addresses
            ],
            "content_type": message.get_content_type(),
            "text": body_of(message, "plain"),
            "html": body_of(message, "html"),
            "defects": [str(d) for d in message.defects],
        }
        folder = "refused" if scripted else "accepted"
        path = os.path.join(self.directory, folder, f"{self.count:04}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        return scripted or "250 2.0.0 Message accepted for delivery"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--tls", choices=["none", "starttls", "tls"], default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth", help="USER:PASSWORD; AUTH is then required")
    args = parser.parse_args()

    context = None
    if args.tls != "none":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    authenticator = None
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login == user.encode()
                and auth_data.password == password.encode()
            )
            return AuthResult(success=ok, handled=False, auth_data=auth_data)

    handler = Handler(args.dir, implicit_tls=args.tls == "tls")

    def factory():
        return SMTP(
            handler,
            hostname="smtp.test",
            tls_context=context if args.tls == "starttls" else None,
            require_starttls=args.tls == "starttls",
            authenticator=authenticator,
            auth_required=authenticator is not None,
            # With implicit TLS the whole session is encrypted already.
            auth_require_tls=args.tls != "tls",
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, "127.0.0.1", args.port, ssl=context if args.tls == "tls" else None
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
