"""The worker's long-lived parts in one process: the MQTT link and its command intake, the
interval scheduler and the live feeds, and the relay of the store's wake-up hints they sleep
on, started and stopped together.

systemd's watchdog (``WatchdogSec=``) is pinged from the scheduler's loop, and only while the
consumer shows it still runs tasks (``consumer_alive``): a hung scheduler or a consumer whose
threads are all stuck stops the pings, and systemd restarts the worker."""
from __future__ import annotations

import logging

from mash import sdnotify
from mash.tasks import firebase_apps
from mash.tasks.intake import FirebaseCommandQueue, MQTTIntake
from mash.tasks.live import FirebaseLiveFeed, LiveFeed
from mash.tasks.loop import HintRelay
from mash.tasks.schedule import IntervalScheduler

log = logging.getLogger("mash.worker")


class WorkerService:
    def __init__(self, ctx, jobs, busy, live_feed: bool = True, consumer_alive=None):
        self.ctx = ctx
        self.watchdog = sdnotify.Watchdog()
        self.consumer_alive = consumer_alive or (lambda: True)
        self.scheduler = IntervalScheduler(ctx, jobs, busy, on_tick=self._tick,
                                           ping_every=self.watchdog.every)
        self.intake = MQTTIntake(ctx) if ctx.mqtt is not None else None
        self.live = LiveFeed(ctx) if live_feed and ctx.mqtt is not None else None
        apps = firebase_apps.apps_on(ctx)          # the MASH apps' live values and commands
        self.fb_live = FirebaseLiveFeed(ctx) if live_feed and apps else None
        self.fb_commands = FirebaseCommandQueue(ctx) if apps else None
        self.hints = HintRelay(ctx.store)     # the loops sleep until another process commits
        for part in (self.scheduler, self.live, self.fb_live):
            if part is not None:
                self.hints.subscribe(part)
        self.connect_hooks: list = []     # called (in paho's thread) on every MQTT connect
        self.started = False

    def start(self) -> "WorkerService":
        ctx = self.ctx
        if ctx.mqtt is not None:
            self.intake.start()
            ctx.mqtt.set_command_callback(self.intake.offer, raw=True)
            if ctx.backend is not None and ctx.backend.profile.name == "mash":
                ctx.backend_topic_callback = self.intake.offer_backend
                if ctx.backend_device is not None:
                    ctx.mqtt.watch_backend_device(ctx.backend_device, self.intake.offer_backend)
            ctx.mqtt.status_extra = ctx.stats
            ctx.mqtt.on_state_change = self._mqtt_state
            ctx.mqtt.connect(timeout=0)
        ctx.store.beat("worker", ctx.intervals["heartbeat"])
        firebase_apps.announce(ctx)
        self.hints.start()
        self.scheduler.start()
        for part in (self.live, self.fb_live, self.fb_commands):
            if part is not None:
                part.start()
        self.started = True
        log.info("worker started: backend %s, MQTT %s, Firebase %s",
                 "on" if ctx.backend else "off", "on" if ctx.mqtt else "off",
                 "on" if ctx.firebase else "off")
        return self

    def _tick(self) -> None:
        if self.watchdog.enabled and self.consumer_alive():
            self.watchdog.ping()

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        for part in (self.fb_commands, self.fb_live, self.live, self.scheduler, self.intake,
                     self.hints):
            if part is not None:
                part.stop()
        firebase_apps.say_offline(self.ctx)
        self.ctx.close()
        log.info("worker stopped")

    def _mqtt_state(self, connected: bool) -> None:
        if connected:
            self.ctx.store.sink_ok("mqtt")
            for hook in self.connect_hooks:
                hook()
            if self.live is not None:
                self.live.wake()              # a new session: the retained states again
            self.ctx.wake("deliver")       # what waited for the broker goes now
        else:
            self.ctx.store.sink_failed("mqtt", "disconnected")
