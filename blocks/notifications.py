"""E-mail for mercure's rule notifications: Prefect has no SMTP notification block.

``SmtpServer`` is the site's mail relay, one document the site fills in (mercure keeps it
outside mercure.json: it sends through ``localhost:25``, which are the defaults here).
``SmtpEmailNotification`` is a rule's e-mail: its recipients and text type, pointing at that
server. It is a Prefect notification block, so an automation's "send a notification" action
sends it; the Prefect server loads this class through our ``prefect.collections`` entry point
(``blocks.registry``), which Prefect imports before it looks a block class up by its slug.
The message is built as mercure's ``send_email_helper`` builds it, one mail per address.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from typing import Literal

from prefect.blocks.abstract import NotificationBlock, NotificationError
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

__all__ = ["DEFAULT_SENDER", "SMTP_SERVER_NAME", "SmtpEmailNotification", "SmtpServer"]

#: mercure's ``email_notification_from`` default.
DEFAULT_SENDER = "mercure@mercure.mercure"
#: The document ``import-config`` creates and keeps for the site.
SMTP_SERVER_NAME = "mercure-smtp"


class SmtpServer(Block):
    """The mail relay that rule notifications are sent through.

    Example:
        ```python
        from blocks.notifications import SmtpServer

        SmtpServer(host="mail.example.org", port=587, security="starttls").save(
            "mercure-smtp", overwrite=True
        )
        smtp = SmtpServer.load("BLOCK_NAME")  # e.g. "mercure-smtp"
        ```
    """

    _block_type_name = "SMTP Server"
    _block_type_slug = "smtp-server"
    _description = "Mail relay for mercure's rule e-mails (mercure: localhost:25, no login)."

    host: str = Field(default="localhost", description="SMTP host.")
    port: int = Field(default=25, ge=1, le=65535, description="SMTP port.")
    security: Literal["none", "starttls", "ssl"] = Field(
        default="none", description="none, STARTTLS after connecting, or TLS from the start."
    )
    username: str = Field(default="", description="Login (empty: no login).")
    password: SecretStr = Field(default=SecretStr(""), description="Password of the login.")
    sender: str = Field(
        default=DEFAULT_SENDER, description="From address (mercure's email_notification_from)."
    )
    timeout: float = Field(default=30, gt=0, description="Seconds per SMTP operation.")

    def send(self, messages: list[EmailMessage]) -> None:
        """Send the messages over one connection."""
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "ssl":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if self.security == "starttls":
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username, self.password.get_secret_value())
            for message in messages:
                smtp.send_message(message)
        finally:
            smtp.quit()


class SmtpEmailNotification(NotificationBlock):
    """A rule's e-mail: one message per recipient, plain or HTML, through an SMTP server.

    Example:
        ```python
        from blocks.notifications import SmtpEmailNotification, SmtpServer

        mail = SmtpEmailNotification(smtp=SmtpServer.load("mercure-smtp"), to=["a@example.org"])
        mail.save("ct-mail")
        mail = SmtpEmailNotification.load("BLOCK_NAME")  # e.g. "ct-mail"
        await mail.notify("case sent", subject="[Mercure] Rule ct: COMPLETED")
        ```
    """

    _block_type_name = "SMTP E-mail Notification"
    _block_type_slug = "smtp-email-notification"
    _description = "Sends a notification as e-mail, one per recipient, through an SMTP server."

    smtp: SmtpServer = Field(description="The SMTP server (import-config: mercure-smtp).")
    to: list[str] = Field(default_factory=list, description="Recipients, one mail each.")
    email_type: str = Field(
        default="plain", description="text/<type> of the body: plain or html (mercure)."
    )

    def messages(self, body: str, subject: str | None) -> list[EmailMessage]:
        """mercure's ``send_email_helper`` message for each recipient."""
        out = []
        for address in self.to:
            message = EmailMessage()
            message["Subject"] = subject or ""
            message["From"] = self.smtp.sender
            message["To"] = address
            message.set_content(body, subtype=self.email_type)
            out.append(message)
        return out

    async def notify(self, body: str, subject: str | None = None) -> None:
        """Send in a worker thread (smtplib blocks); a failure is a ``NotificationError``."""
        try:
            await asyncio.to_thread(self.smtp.send, self.messages(body, subject))
        except (OSError, smtplib.SMTPException) as exc:
            raise NotificationError(log=f"{self.smtp.host}:{self.smtp.port}: {exc}") from exc
